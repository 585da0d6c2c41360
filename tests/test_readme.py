"""
README.rst against the code: the configuration table lists every setting of
:data:`loghandler.config.SETTINGS` (and nothing else) with its ``twistd loghandler``
option and its default, so that it stays true as settings are added; the documents
it shows (``contrib/aws/``'s IAM policy and lifecycle rules, the Athena statement,
the shell snippets) parse, and agree with what the code does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from loghandler.config import SETTINGS, Config
from loghandler.keys import key_for
from loghandler.message import Message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.rst")
AWS = os.path.join(ROOT, "contrib", "aws")

#: The option cell of a secret, which has no option.
ENVIRONMENT_ONLY = "(environment only)"


def readme() -> str:
    """The text of README.rst."""
    with open(README, encoding="utf-8") as f:
        return f.read()


def simple_table(text: str, header: list[str]) -> list[list[str]]:
    """
    The rows of the reStructuredText simple table of ``text`` whose header row has
    the cells ``header``: each row its cells, a cell's lines joined by spaces (a line
    with an empty first cell continues the row above).

    :raises AssertionError: when there is no such table.
    """
    lines = text.splitlines()
    for i in range(1, len(lines) - 1):
        border = lines[i - 1]
        if not re.fullmatch(r"=+( +=+)*", border) or lines[i + 1] != border:
            continue
        spans = [m.span() for m in re.finditer(r"=+", border)]

        def cells(line: str) -> list[str]:
            # The last column runs to the end of the line.
            ends = [start for start, _ in spans[1:]] + [len(line)]
            return [line[start:end].strip() for (start, _), end in zip(spans, ends)]

        if cells(lines[i]) != header:
            continue
        rows: list[list[str]] = []
        for line in lines[i + 2 :]:
            if line == border:
                return rows
            row = cells(line)
            if row[0]:
                rows.append(row)
            elif any(row):
                rows[-1] = [" ".join(filter(None, pair)) for pair in zip(rows[-1], row)]
        raise AssertionError(f"the table {header} does not end")
    raise AssertionError(f"no table with the header {header} in README.rst")


class ConfigurationTableTests(SynchronousTestCase):
    """The Configuration section's table against ``loghandler.config.SETTINGS``."""

    def setUp(self) -> None:
        rows = simple_table(readme(), ["variable", "twistd option", "default", "meaning"])
        self.rows = {row[0]: row for row in rows}
        self.assertEqual(len(self.rows), len(rows), "a variable has two rows")

    def test_every_setting_and_nothing_else(self) -> None:
        """The table lists exactly the settings of config.py, in their order."""
        self.assertEqual(list(self.rows), [setting.env for setting in SETTINGS])

    def test_options(self) -> None:
        """
        Each row names the setting's ``twistd loghandler`` option, or says that a
        secret is read from the environment only.
        """
        for setting in SETTINGS:
            expected = ENVIRONMENT_ONLY if setting.secret else "--" + setting.option
            self.assertEqual(self.rows[setting.env][1], expected, setting.env)

    def test_defaults(self) -> None:
        """
        A setting with a default shows it as the variable is written (the default
        cell starts with it: ``10, 30 (Azure)`` for CHECKPOINT_S); one without says
        why in words or parentheses (``required``, ``(chain)``).
        """
        for setting in SETTINGS:
            shown = self.rows[setting.env][2]
            if setting.default_text:
                self.assertTrue(
                    re.match(re.escape(setting.default_text) + r"\b", shown),
                    f"{setting.env}: default {setting.default_text!r}, README says {shown!r}",
                )
            else:
                self.assertTrue(shown == "required" or shown.startswith("("), setting.env)

    def test_meanings(self) -> None:
        """Every row says what the setting means."""
        for env, row in self.rows.items():
            self.assertTrue(row[3], env)

    def test_parser_joins_continuation_lines(self) -> None:
        """simple_table joins a row's continuation lines cell by cell."""
        text = "\n".join(
            [
                "==  ====  =====",
                "a   b     c",
                "==  ====  =====",
                "x   1     one",
                "    2     two",
                "y         three",
                "==  ====  =====",
            ]
        )
        self.assertEqual(
            simple_table(text, ["a", "b", "c"]), [["x", "1 2", "one two"], ["y", "", "three"]]
        )


def code_blocks(text: str, language: str) -> list[str]:
    """
    The contents of every ``.. code-block:: {language}`` of ``text``, dedented by
    their first line's indent.
    """
    blocks = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != f".. code-block:: {language}":
            continue
        body: list[str] = []
        for following in lines[i + 1 :]:
            if following.strip() and not following.startswith((" ", "\t")):
                break
            body.append(following)
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        indent = len(body[0]) - len(body[0].lstrip())
        blocks.append("\n".join(line[indent:] for line in body) + "\n")
    return blocks


def aws_document(name: str) -> Any:
    """``contrib/aws/{name}``, parsed."""
    with open(os.path.join(AWS, name), encoding="utf-8") as f:
        return json.load(f)


def as_list(value: Any) -> list[Any]:
    """An IAM policy element that may be one value or a list, as a list."""
    return value if isinstance(value, list) else [value]


#: The IAM action each S3 operation of the daemon needs, from each operation's page of
#: the S3 API reference (https://docs.aws.amazon.com/AmazonS3/latest/API/), and
#: whether it acts on the bucket (else on objects).
OPERATION_ACTIONS = {
    "HeadBucket": ("s3:ListBucket", True),
    "ListObjectsV2": ("s3:ListBucket", True),
    "ListMultipartUploads": ("s3:ListBucketMultipartUploads", True),
    "GetBucketVersioning": ("s3:GetBucketVersioning", True),
    "HeadObject": ("s3:GetObject", False),
    "GetObject": ("s3:GetObject", False),
    "PutObject": ("s3:PutObject", False),
    "CreateMultipartUpload": ("s3:PutObject", False),
    "UploadPart": ("s3:PutObject", False),
    "UploadPartCopy": ("s3:PutObject", False),
    "CompleteMultipartUpload": ("s3:PutObject", False),
    "AbortMultipartUpload": ("s3:AbortMultipartUpload", False),
    "ListParts": ("s3:ListMultipartUploadParts", False),
    "DeleteObject": ("s3:DeleteObject", False),
}


class DocumentsTests(SynchronousTestCase):
    """The JSON documents README shows are the files of contrib/aws/, and they parse."""

    def test_json_blocks_are_the_files(self) -> None:
        """
        Every JSON block of README parses, and they are, in order, the IAM policy and
        the lifecycle rules of contrib/aws/ as they are in the files.
        """
        blocks = [json.loads(block) for block in code_blocks(readme(), "json")]
        self.assertEqual(
            blocks, [aws_document("iam-policy.json"), aws_document("lifecycle.json")]
        )

    def test_shell_blocks_parse(self) -> None:
        """Every ``sh`` block of README is valid shell syntax (``bash -n``)."""
        blocks = code_blocks(readme(), "sh")
        self.assertGreater(len(blocks), 3)
        for block in blocks:
            checked = subprocess.run(
                ["bash", "-n"], input=block, capture_output=True, text=True, check=False
            )
            self.assertEqual((checked.returncode, checked.stderr), (0, ""), block)


class IAMPolicyTests(SynchronousTestCase):
    """
    ``contrib/aws/iam-policy.json`` against the S3 calls of
    ``loghandler/storage/s3/client.py`` (moto's IAM runs them with it:
    ``tests/integration/test_aws_setup.py``).
    """

    def setUp(self) -> None:
        self.policy = aws_document("iam-policy.json")
        self.statements = self.policy["Statement"]
        self.s3 = [
            (action, resource)
            for statement in self.statements
            for action in as_list(statement["Action"])
            if action.startswith("s3:")
            for resource in as_list(statement["Resource"])
        ]

    def test_shape(self) -> None:
        """Version 2012-10-17, every statement an Allow with actions and resources."""
        self.assertEqual(self.policy["Version"], "2012-10-17")
        for statement in self.statements:
            self.assertEqual(statement["Effect"], "Allow")
            self.assertTrue(as_list(statement["Action"]))
            self.assertTrue(as_list(statement["Resource"]))

    def test_operations_of_the_client(self) -> None:
        """
        The S3 operations client.py names are those of OPERATION_ACTIONS (a new call
        must be mapped, and the policy checked, here).
        """
        import botocore.session

        operations = set(botocore.session.get_session().get_service_model("s3").operation_names)
        with open(os.path.join(ROOT, "loghandler", "storage", "s3", "client.py")) as f:
            named = set(re.findall(r'"([A-Z][A-Za-z0-9]+)"', f.read())) & operations
        self.assertEqual(named, set(OPERATION_ACTIONS))

    def test_exactly_the_actions_needed(self) -> None:
        """
        The policy grants each operation's action on the bucket, or on both
        ``chat/*`` and ``_loghandler/*`` (DeleteObject on ``_loghandler/*`` only), and
        no other S3 action or resource.
        """
        bucket = "arn:aws:s3:::BUCKET"
        objects = {bucket + "/chat/*", bucket + "/_loghandler/*"}
        needed = set()
        for action, on_bucket in OPERATION_ACTIONS.values():
            if on_bucket:
                needed.add((action, bucket))
            elif action == "s3:DeleteObject":
                needed.add((action, bucket + "/_loghandler/*"))
            else:
                needed.update((action, resource) for resource in objects)
        self.assertEqual(set(self.s3), needed)

    def test_kms(self) -> None:
        """The KMS statement grants GenerateDataKey and Decrypt on one key, through S3."""
        (kms,) = [s for s in self.statements if as_list(s["Action"])[0].startswith("kms:")]
        self.assertEqual(sorted(as_list(kms["Action"])), ["kms:Decrypt", "kms:GenerateDataKey"])
        self.assertRegex(kms["Resource"], r"^arn:aws:kms:REGION:ACCOUNT_ID:key/KEY_ID$")
        self.assertEqual(
            kms["Condition"], {"StringEquals": {"kms:ViaService": "s3.REGION.amazonaws.com"}}
        )

    def test_action_names_and_resource_types(self) -> None:
        """
        Every action exists in IAM, and an S3 action's resource is of its kind
        (bucket or object), by the service reference cfn-lint ships (installed with
        moto[server]).
        """
        from importlib.resources import files

        reference = json.loads(
            files("cfnlint.data.AdditionalSpecs").joinpath("Policies.json").read_text()
        )
        for statement in self.statements:
            for action in as_list(statement["Action"]):
                service, name = action.split(":")
                self.assertIn(name.lower(), reference[service]["Actions"], action)
                if service != "s3":
                    continue
                kinds = reference["s3"]["Actions"][name.lower()]["Resources"]
                for resource in as_list(statement["Resource"]):
                    kind = "object" if "/" in resource.split(":::", 1)[1] else "bucket"
                    self.assertIn(kind, kinds, (action, resource))


class LifecycleTests(SynchronousTestCase):
    """``contrib/aws/lifecycle.json``: valid for S3, and safe for the daemon's data."""

    def setUp(self) -> None:
        self.rules = aws_document("lifecycle.json")["Rules"]

    def test_valid_request(self) -> None:
        """
        The rules are a valid LifecycleConfiguration of
        PutBucketLifecycleConfiguration by botocore's model of S3.
        """
        import botocore.session
        from botocore.validate import validate_parameters

        model = botocore.session.get_session().get_service_model("s3")
        shape = model.operation_model("PutBucketLifecycleConfiguration").input_shape
        validate_parameters(
            {"Bucket": "logs", "LifecycleConfiguration": {"Rules": self.rules}}, shape
        )

    def test_abort_well_after_the_lease_window(self) -> None:
        """
        One rule aborts incomplete multipart uploads, 7 days after their start: far
        beyond a staging upload's life (QUEUE_TIMEOUT_MIN, an hour by default) and
        recovery's window.
        """
        (rule,) = [r for r in self.rules if "AbortIncompleteMultipartUpload" in r]
        days = rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
        self.assertEqual(days, 7)
        config = Config()
        window_s = config.queue_timeout_s + config.shutdown_timeout_s + 3 * config.lease_s
        self.assertGreater(days * 86400, 100 * (window_s + config.recovery_interval_s))

    def test_noncurrent_versions_expire(self) -> None:
        """One rule expires noncurrent versions, for the whole bucket."""
        (rule,) = [r for r in self.rules if "NoncurrentVersionExpiration" in r]
        self.assertEqual(rule["Filter"], {"Prefix": ""})
        self.assertGreaterEqual(rule["NoncurrentVersionExpiration"]["NoncurrentDays"], 1)

    def test_no_current_object_expires(self) -> None:
        """
        No rule expires current objects (by days or date): the daemon deletes what
        it is done with under ``_loghandler/``, and recovery needs the rest.
        """
        for rule in self.rules:
            self.assertEqual(rule["Status"], "Enabled")
            expiration = rule.get("Expiration", {})
            self.assertEqual(set(expiration) - {"ExpiredObjectDeleteMarker"}, set(), rule["ID"])


class AthenaTableTests(SynchronousTestCase):
    """README's CREATE EXTERNAL TABLE, parsed (sqlglot, Athena's dialect), against the code."""

    def setUp(self) -> None:
        import sqlglot
        from sqlglot import exp

        (self.sql,) = code_blocks(readme(), "sql")
        self.table = sqlglot.parse_one(self.sql, read="athena")
        self.exp = exp
        self.properties = {
            p.name: p.text("value")
            for p in self.table.find_all(exp.Property)
            if p.name.startswith(("projection.", "storage."))
        }

    def test_external_json_table(self) -> None:
        """An external table of the OpenX JSON SerDe, located under the copies."""
        self.assertEqual(self.table.args["kind"], "TABLE")
        self.assertIn("CREATE EXTERNAL TABLE", self.sql)
        self.assertIn("'org.openx.data.jsonserde.JsonSerDe'", self.sql)
        location = self.table.find(self.exp.LocationProperty)
        assert location is not None
        self.assertEqual(location.this.name, "s3://BUCKET/athena/chat/")

    def test_columns_are_the_line_fields(self) -> None:
        """The columns are the fields of a stored line, in their order."""
        schema = self.table.this
        columns = [c.name for c in schema.expressions if isinstance(c, self.exp.ColumnDef)]
        line = Message("t", 1, 2, 3).to_line()
        self.assertEqual(columns, list(json.loads(line)))

    def test_projection_matches_keys(self) -> None:
        """
        The partition ``date`` is projected with the keys' date format, and the
        template's folder is the folder of key_for's keys, under ``athena/``.
        """
        self.assertEqual(self.properties["projection.enabled"], "true")
        self.assertEqual(self.properties["projection.date.type"], "date")
        strftime = (
            self.properties["projection.date.format"]
            .replace("yyyy", "%Y")
            .replace("MM", "%m")
            .replace("dd", "%d")
        )
        timestamp_ms = 1585526400123  # 2020-03-30
        day = "2020-03-30"
        from datetime import datetime, timezone

        self.assertEqual(
            datetime.fromtimestamp(timestamp_ms / 1000, timezone.utc).strftime(strftime), day
        )
        template = self.properties["storage.location.template"]
        self.assertTrue(template.startswith("s3://BUCKET/athena/"), template)
        folder = template[len("s3://BUCKET/athena/") :].replace("${date}", day)
        key = key_for(timestamp_ms, 3)
        self.assertEqual(key[: len(folder)], folder)
        self.assertNotIn("/", key[len(folder) :])
