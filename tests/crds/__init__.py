"""The ModelDeployment CRD checked without a cluster: schema, defaults, CEL rules, examples."""
