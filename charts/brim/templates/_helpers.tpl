{{/*
The chart's few helpers. Object names follow Helm's usual rule; labels follow Kubernetes'
recommended app.kubernetes.io/* set.
*/}}

{{/*
brim.name: the chart name, or nameOverride.
*/}}
{{- define "brim.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
brim.fullname: the operator's objects' name: fullnameOverride, else "<release>-brim", or just
"<release>" when the release name already contains the chart name (`helm install brim` gives
"brim", not "brim-brim"). 63 characters at most (DNS label).
*/}}
{{- define "brim.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "brim.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
brim.selectorLabels: the labels that select the operator pod (never change on upgrade: a
Deployment's selector is immutable).
*/}}
{{- define "brim.selectorLabels" -}}
app.kubernetes.io/name: {{ include "brim.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
brim.labels: the labels of every object the chart creates. Called with a dict:
  (dict "ctx" $ "component" "operator"); component says which part of brim the object is for.
managed-by is Helm here: the operator's own children say brim-operator, which is what the
runtime ServiceMonitor selects, so the two never mix.
*/}}
{{- define "brim.labels" -}}
app.kubernetes.io/name: {{ include "brim.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
brim.serviceAccountName: the operator's ServiceAccount.
*/}}
{{- define "brim.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "brim.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
brim.image: "<repository>@<digest>" when a digest is set, else "<repository>:<tag or
appVersion>". Called with a dict: (dict "image" .Values.operator.image "ctx" $).
*/}}
{{- define "brim.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}
