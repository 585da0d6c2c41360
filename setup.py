"""loghandler: streams log messages POSTed over HTTP as gzip NDJSON to S3."""

from setuptools import setup

setup(
    name="loghandler",
    version="0.1.0",
    description="Stream POSTed log messages as gzip NDJSON into one S3 object per day and client",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.9",
    packages=["loghandler", "loghandler.storage", "loghandler.storage.s3", "twisted.plugins"],
    install_requires=[
        "twisted>=23.10",
        "treq>=23.11",
        "botocore>=1.31",
        "attrs>=23.1",
    ],
    extras_require={
        "test": ["hypothesis>=6.80", "moto[server]>=5.0"],
        "dev": ["mypy>=1.8", "mypy-zope>=1.0"],
    },
)
