"""Fixtures for the operator's tests: one emulated Kubernetes API server for the whole session,
and a fresh namespace per test to keep tests apart."""

from __future__ import annotations

import pytest

from tests.operator.emulator import KubeEmulator


@pytest.fixture(scope="session")
def kube(tmp_path_factory):
    """The emulated cluster (see `KubeEmulator`): `.url`, `.kubeconfig`, direct object access,
    `.add_validator`, `.fail`/`.hang`, `.audit`, `.kubectl`, `.reset`. Shared by all tests;
    isolate tests by namespace (the `namespace` fixture)."""
    with KubeEmulator(tmp_path_factory.mktemp("kube")) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def _kube_per_test_state(request):
    """For tests that use the cluster: start with an empty audit log, and drop the faults and
    validators they plugged in when they end, so that none leaks into the next test."""
    if "kube" not in request.fixturenames:
        yield
        return
    kube = request.getfixturevalue("kube")
    kube.audit.clear()
    yield
    kube.faults.clear()
    kube.store.validators.clear()


@pytest.fixture
def namespace(kube):
    """A new namespace for one test, deleted (with everything in it) afterwards."""
    name = kube.create_namespace("test")
    yield name
    if kube.get("namespaces", name) is not None:  # a test may have reset the cluster
        kube.delete("namespaces", name)
