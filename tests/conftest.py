pytest_plugins = [
    "tests.harness.backends",
    "tests.harness.etcd",
    "tests.harness.nginx",
]
