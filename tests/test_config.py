"""
Tests for :mod:`loghandler.config` (environment to ``Config``, one-line errors that
start with the variable's name) and for the option handling of :mod:`loghandler.tap`.
"""

from __future__ import annotations

import io
import re
import sys
from types import ModuleType
from typing import Mapping

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from loghandler.config import Config, ConfigError, MiB, from_environ

#: The smallest environment that configures the S3 store.
BASE = {"AWS_BUCKET": "logs", "AWS_REGION": "eu-west-1"}


def _tap() -> ModuleType:
    """
    ``loghandler.tap``, imported when a test needs it, so that the config tests do not
    depend on the service modules that tap imports.
    """
    from loghandler import tap

    return tap


class DefaultsTests(SynchronousTestCase):
    """``from_environ`` with only the required variables gives the documented defaults."""

    def test_defaults(self) -> None:
        """Every setting not given takes its default value."""
        config = from_environ(BASE)
        self.assertEqual(config.addr, "0.0.0.0")
        self.assertEqual(config.port, 8902)
        self.assertEqual(config.storage, "aws")
        self.assertEqual(config.queue_timeout_s, 3600.0)
        self.assertIs(config.no_upload, False)
        self.assertIsNone(config.aws_access_key)
        self.assertIsNone(config.aws_access_secret)
        self.assertEqual(config.aws_region, "eu-west-1")
        self.assertEqual(config.aws_bucket, "logs")
        self.assertIsNone(config.aws_endpoint_url)
        self.assertEqual(config.shutdown_timeout_s, 25.0)
        self.assertEqual(config.part_size, 5 * 1024 * 1024)
        self.assertEqual(config.max_client_id, 10)
        self.assertEqual(config.max_body_bytes, 65536)
        self.assertEqual(config.batch_max_bytes, 1048576)
        self.assertEqual(config.batch_max_lines, 1000)
        self.assertEqual(config.timestamp_max_age_s, 7 * 24 * 3600.0)
        self.assertEqual(config.timestamp_max_ahead_s, 3600.0)
        self.assertEqual(config.buffer_budget_bytes, 256 * MiB)
        self.assertEqual(config.client_budget_bytes, 64 * MiB)
        self.assertEqual(config.parts_in_flight, 2)
        self.assertEqual(config.completions_in_flight, 4)
        self.assertIs(config.access_log, False)
        self.assertEqual(config.checkpoint_s, 10.0)
        self.assertEqual(config.lease_s, 10.0)
        self.assertEqual(config.recovery_interval_s, 30.0)
        self.assertEqual(config.ack, "accepted")
        self.assertEqual(config.durable_timeout_s, 10.0)
        self.assertEqual(config.ready_fail_after_s, 30.0)
        self.assertEqual(config.admin_addr, "0.0.0.0")
        self.assertIsNone(config.admin_port)

    def test_defaults_equal_config_defaults(self) -> None:
        """The environment-built defaults equal the Config class defaults."""
        self.assertEqual(
            from_environ(BASE), Config(aws_bucket="logs", aws_region="eu-west-1")
        )

    def test_unrelated_variables_ignored(self) -> None:
        """Variables that are not settings (HOME, PATH) change nothing."""
        self.assertEqual(
            from_environ(dict(BASE, HOME="/root", PATH="/bin", port="1")), from_environ(BASE)
        )

    def test_empty_value_means_default(self) -> None:
        """An empty or blank variable is the same as an absent one."""
        config = from_environ(dict(BASE, PORT="", ADDR="  ", QUEUE_TIMEOUT_MIN=""))
        self.assertEqual((config.port, config.addr, config.queue_timeout_s), (8902, "0.0.0.0", 3600.0))


class ValueTests(SynchronousTestCase):
    """Well-formed values are parsed into the right types and units."""

    def test_queue_timeout_minutes_to_seconds(self) -> None:
        """QUEUE_TIMEOUT_MIN=0.05 is 3.0 seconds."""
        self.assertEqual(from_environ(dict(BASE, QUEUE_TIMEOUT_MIN="0.05")).queue_timeout_s, 3.0)

    def test_queue_timeout_whole_minutes(self) -> None:
        """QUEUE_TIMEOUT_MIN=15 is 900 seconds."""
        self.assertEqual(from_environ(dict(BASE, QUEUE_TIMEOUT_MIN="15")).queue_timeout_s, 900.0)

    def test_values_parsed(self) -> None:
        """Each variable fills its field with the parsed value."""
        config = from_environ(
            dict(
                BASE,
                ADDR="127.0.0.1",
                PORT=" 9000 ",
                STORAGE="AWS",
                AWS_ENDPOINT_URL="http://127.0.0.1:5000/",
                AWS_ACCESS_KEY="AKID",
                AWS_ACCESS_SECRET="secret",
                SHUTDOWN_TIMEOUT_S="10.5",
                PART_SIZE_BYTES=str(8 * MiB),
                MAX_CLIENT_ID="50",
                MAX_BODY_BYTES="1024",
                TIMESTAMP_MAX_AGE_S="60",
                TIMESTAMP_MAX_AHEAD_S="30",
                BUFFER_BUDGET_BYTES=str(64 * MiB),
                PARTS_IN_FLIGHT="4",
                COMPLETIONS_IN_FLIGHT="16",
                ACCESS_LOG="1",
            )
        )
        self.assertEqual(
            config,
            Config(
                addr="127.0.0.1",
                port=9000,
                storage="aws",
                aws_bucket="logs",
                aws_region="eu-west-1",
                aws_endpoint_url="http://127.0.0.1:5000",
                aws_access_key="AKID",
                aws_access_secret="secret",
                shutdown_timeout_s=10.5,
                part_size=8 * MiB,
                max_client_id=50,
                max_body_bytes=1024,
                timestamp_max_age_s=60.0,
                timestamp_max_ahead_s=30.0,
                buffer_budget_bytes=64 * MiB,
                client_budget_bytes=16 * MiB,  # a quarter of the budget, when unset
                parts_in_flight=4,
                completions_in_flight=16,
                access_log=True,
            ),
        )

    def test_flag_values(self) -> None:
        """
        NO_UPLOAD and ACCESS_LOG take exactly 1 and 0 (spaces around aside); empty is
        the default, 0.
        """
        for variable, field in (("NO_UPLOAD", "no_upload"), ("ACCESS_LOG", "access_log")):
            for text in ("1", " 1 "):
                self.assertIs(getattr(from_environ(dict(BASE, **{variable: text})), field), True)
            for text in ("0", "", " "):
                self.assertIs(getattr(from_environ(dict(BASE, **{variable: text})), field), False)

    def test_part_size_minimum_accepted(self) -> None:
        """PART_SIZE_BYTES of exactly 5 MiB is accepted."""
        self.assertEqual(
            from_environ(dict(BASE, PART_SIZE_BYTES=str(5 * MiB))).part_size, 5 * MiB
        )

    def test_overrides_win(self) -> None:
        """An override replaces the environment's value of the same variable."""
        config = from_environ(
            dict(BASE, PORT="1234", AWS_BUCKET="from-env"),
            {"PORT": "9000", "AWS_BUCKET": "from-option"},
        )
        self.assertEqual((config.port, config.aws_bucket), (9000, "from-option"))

    def test_override_alone(self) -> None:
        """An override works without the variable in the environment."""
        self.assertEqual(from_environ(BASE, {"MAX_CLIENT_ID": "20"}).max_client_id, 20)

    def test_environ_not_modified(self) -> None:
        """from_environ does not change the mapping it is given."""
        environ = dict(BASE, PORT="1")
        from_environ(environ, {"PORT": "2"})
        self.assertEqual(environ, dict(BASE, PORT="1"))


class ErrorTests(SynchronousTestCase):
    """Every malformed or missing value raises one single-line ConfigError naming it."""

    def assertConfigError(
        self, environ: Mapping[str, str], variable: str, contains: str = ""
    ) -> str:
        """
        ``from_environ(environ)`` raises a ConfigError whose one-line message starts
        with ``variable + ":"`` and contains ``contains``; returns the message.
        """
        with self.assertRaises(ConfigError) as raised:
            from_environ(environ)
        message = str(raised.exception)
        self.assertTrue(message.startswith(variable + ": "), message)
        self.assertIn(contains, message)
        self.assertEqual(message.splitlines(), [message])
        return message

    def test_probe_settings(self) -> None:
        """READY_FAIL_AFTER_S, ADMIN_ADDR and ADMIN_PORT: parsed, ranges named."""
        config = from_environ(
            dict(BASE, READY_FAIL_AFTER_S="0", ADMIN_ADDR="127.0.0.1", ADMIN_PORT="9102")
        )
        self.assertEqual(
            (config.ready_fail_after_s, config.admin_addr, config.admin_port),
            (0.0, "127.0.0.1", 9102),
        )
        self.assertConfigError(dict(BASE, READY_FAIL_AFTER_S="-1"), "READY_FAIL_AFTER_S", "from 0")
        self.assertConfigError(dict(BASE, ADMIN_ADDR="localhost"), "ADMIN_ADDR", "IP address")
        self.assertConfigError(dict(BASE, ADMIN_PORT="65536"), "ADMIN_PORT", "from 0 to 65535")
        self.assertEqual(
            self.assertConfigError(dict(BASE, ADMIN_PORT="8902"), "ADMIN_PORT"),
            "ADMIN_PORT: must differ from PORT (8902), or be unset to serve the probes on PORT",
        )

    def test_port_not_integer(self) -> None:
        """PORT=abc names PORT and quotes the value."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, PORT="abc"), "PORT"),
            "PORT: must be an integer from 0 to 65535, got 'abc'",
        )

    def test_port_out_of_range(self) -> None:
        """PORT=70000 names PORT and gives the range."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, PORT="70000"), "PORT"),
            "PORT: must be an integer from 0 to 65535, got '70000'",
        )

    def test_port_negative(self) -> None:
        """PORT=-1 is out of range."""
        self.assertConfigError(dict(BASE, PORT="-1"), "PORT", "got '-1'")

    def test_queue_timeout_malformed(self) -> None:
        """QUEUE_TIMEOUT_MIN of -1, 0, nan, inf, -inf or x is refused, naming it."""
        for text in ("-1", "0", "0.0", "nan", "inf", "-inf", "x", "1e999"):
            message = self.assertConfigError(
                dict(BASE, QUEUE_TIMEOUT_MIN=text), "QUEUE_TIMEOUT_MIN", repr(text)
            )
            self.assertEqual(
                message, "QUEUE_TIMEOUT_MIN: must be a number of minutes of at least 0.01, got %r"
                % text
            )

    def test_flags_take_only_0_and_1(self) -> None:
        """
        NO_UPLOAD and ACCESS_LOG refuse anything but 0 and 1 (yes, true, on, off,
        2...) in the same words, naming the variable.
        """
        for variable in ("NO_UPLOAD", "ACCESS_LOG"):
            for text in ("maybe", "yes", "true", "On", "off", "FALSE", "no", "2", "-1", "01"):
                self.assertEqual(
                    self.assertConfigError(dict(BASE, **{variable: text}), variable),
                    "%s: must be 0 or 1, got %r" % (variable, text),
                )

    def test_storage_gcs(self) -> None:
        """STORAGE=gcs is refused, naming STORAGE and quoting the value."""
        self.assertConfigError(dict(BASE, STORAGE="gcs"), "STORAGE", "'gcs'")

    def test_storage_gcs_message(self) -> None:
        """STORAGE=gcs names the two stores there are."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, STORAGE="gcs"), "STORAGE"),
            "STORAGE: must be 'aws' or 'azure', got 'gcs'",
        )

    def test_part_size_below_minimum(self) -> None:
        """PART_SIZE_BYTES one byte under 5 MiB is refused with the range."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, PART_SIZE_BYTES=str(5 * MiB - 1)), "PART_SIZE_BYTES"),
            "PART_SIZE_BYTES: must be an integer from 5242880 to 5368709120, got '5242879'",
        )

    def test_endpoint_not_http(self) -> None:
        """AWS_ENDPOINT_URL=ftp://x is refused."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, AWS_ENDPOINT_URL="ftp://x"), "AWS_ENDPOINT_URL"),
            "AWS_ENDPOINT_URL: must be an http:// or https:// URL, got 'ftp://x'",
        )

    def test_endpoint_without_host(self) -> None:
        """AWS_ENDPOINT_URL=http:// (no host) is refused."""
        self.assertConfigError(dict(BASE, AWS_ENDPOINT_URL="http://"), "AWS_ENDPOINT_URL", "'http://'")

    def test_endpoint_without_scheme(self) -> None:
        """AWS_ENDPOINT_URL=localhost:5000 (no scheme) is refused."""
        self.assertConfigError(dict(BASE, AWS_ENDPOINT_URL="localhost:5000"), "AWS_ENDPOINT_URL")

    def test_max_body_zero(self) -> None:
        """MAX_BODY_BYTES=0 is refused with the range."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, MAX_BODY_BYTES="0"), "MAX_BODY_BYTES"),
            "MAX_BODY_BYTES: must be an integer from 256 to 16777216, got '0'",
        )

    def test_max_client_id_zero(self) -> None:
        """MAX_CLIENT_ID=0 is refused."""
        self.assertConfigError(dict(BASE, MAX_CLIENT_ID="0"), "MAX_CLIENT_ID", "got '0'")

    def test_parts_in_flight_zero(self) -> None:
        """PARTS_IN_FLIGHT=0 is refused."""
        self.assertConfigError(dict(BASE, PARTS_IN_FLIGHT="0"), "PARTS_IN_FLIGHT", "got '0'")

    def test_completions_in_flight_range(self) -> None:
        """COMPLETIONS_IN_FLIGHT takes 1 to 256; 0, 257 and non-integers are refused."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, COMPLETIONS_IN_FLIGHT="0"), "COMPLETIONS_IN_FLIGHT"),
            "COMPLETIONS_IN_FLIGHT: must be an integer from 1 to 256, got '0'",
        )
        self.assertConfigError(dict(BASE, COMPLETIONS_IN_FLIGHT="257"), "COMPLETIONS_IN_FLIGHT", "got '257'")
        self.assertEqual(
            self.assertConfigError(dict(BASE, COMPLETIONS_IN_FLIGHT="2.5"), "COMPLETIONS_IN_FLIGHT"),
            "COMPLETIONS_IN_FLIGHT: must be an integer from 1 to 256, got '2.5'",
        )
        for text, value in (("1", 1), (" 256 ", 256), ("", 4)):
            self.assertEqual(
                from_environ(dict(BASE, COMPLETIONS_IN_FLIGHT=text)).completions_in_flight,
                value,
                text,
            )

    def test_shutdown_timeout_negative(self) -> None:
        """SHUTDOWN_TIMEOUT_S=-5 is refused."""
        self.assertConfigError(dict(BASE, SHUTDOWN_TIMEOUT_S="-5"), "SHUTDOWN_TIMEOUT_S", "'-5'")

    def test_missing_bucket(self) -> None:
        """Without AWS_BUCKET the S3 store cannot start: the error names AWS_BUCKET."""
        self.assertEqual(
            self.assertConfigError({"AWS_REGION": "eu-west-1"}, "AWS_BUCKET"),
            "AWS_BUCKET: required with STORAGE=aws (or set NO_UPLOAD=1)",
        )

    def test_blank_bucket_is_missing(self) -> None:
        """AWS_BUCKET set to spaces counts as missing."""
        self.assertConfigError({"AWS_REGION": "eu-west-1", "AWS_BUCKET": "  "}, "AWS_BUCKET")

    def test_missing_region(self) -> None:
        """Without AWS_REGION the error names AWS_REGION."""
        self.assertEqual(
            self.assertConfigError({"AWS_BUCKET": "logs"}, "AWS_REGION"),
            "AWS_REGION: required with STORAGE=aws (or set NO_UPLOAD=1)",
        )

    def test_no_upload_needs_no_bucket(self) -> None:
        """With NO_UPLOAD=1 neither AWS_BUCKET nor AWS_REGION is required."""
        config = from_environ({"NO_UPLOAD": "1"})
        self.assertEqual(
            (config.no_upload, config.aws_bucket, config.aws_region), (True, None, None)
        )

    def test_key_without_secret(self) -> None:
        """AWS_ACCESS_KEY alone is an error naming the missing AWS_ACCESS_SECRET."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, AWS_ACCESS_KEY="AKID"), "AWS_ACCESS_SECRET"),
            "AWS_ACCESS_SECRET: AWS_ACCESS_KEY and AWS_ACCESS_SECRET go together",
        )

    def test_secret_without_key(self) -> None:
        """AWS_ACCESS_SECRET alone is an error naming the missing AWS_ACCESS_KEY."""
        self.assertConfigError(dict(BASE, AWS_ACCESS_SECRET="s"), "AWS_ACCESS_KEY")

    def test_sse_unknown(self) -> None:
        """S3_SSE takes AES256 or aws:kms as S3 spells them: aes256, KMS, SSE-C refused."""
        for value in ("aes256", "AWS:KMS", "kms", "aws:kms:dsse", "SSE-C"):
            self.assertEqual(
                self.assertConfigError(dict(BASE, S3_SSE=value), "S3_SSE"),
                f"S3_SSE: must be AES256 or aws:kms (as S3 spells them), got {value!r}",
            )

    def test_kms_key_without_kms(self) -> None:
        """S3_SSE_KMS_KEY_ID without S3_SSE=aws:kms is an error naming it and S3_SSE."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, S3_SSE_KMS_KEY_ID="alias/logs"), "S3_SSE_KMS_KEY_ID"),
            "S3_SSE_KMS_KEY_ID: only with S3_SSE=aws:kms, got S3_SSE=(unset)",
        )
        self.assertConfigError(
            dict(BASE, S3_SSE="AES256", S3_SSE_KMS_KEY_ID="alias/logs"),
            "S3_SSE_KMS_KEY_ID",
            "got S3_SSE=AES256",
        )

    def test_kms_key_malformed(self) -> None:
        """A key ID with a space or outside printable ASCII is refused."""
        for value in ("alias/my logs", "alias/lögs", "a" * 2049):
            self.assertConfigError(
                dict(BASE, S3_SSE="aws:kms", S3_SSE_KMS_KEY_ID=value), "S3_SSE_KMS_KEY_ID"
            )

    def test_multiline_value_gives_one_line(self) -> None:
        """A value holding newlines still gives a one-line message."""
        message = self.assertConfigError(dict(BASE, PORT="80\n81\r\n"), "PORT")
        self.assertNotIn("\n", message)
        self.assertNotIn("\r", message)

    def test_every_setting_error_is_one_line(self) -> None:
        """For every variable that can be malformed, the error is one line starting with it."""
        bad = {
            "PORT": "a\nb",
            "STORAGE": "s3\nx",
            "QUEUE_TIMEOUT_MIN": "1\n2",
            "NO_UPLOAD": "x\ny",
            "AWS_ENDPOINT_URL": "gopher://\nx",
            "SHUTDOWN_TIMEOUT_S": "1\u2028x",
            "PART_SIZE_BYTES": "1\r2",
            "MAX_CLIENT_ID": "0",
            "MAX_BODY_BYTES": "1\x0b",
            "BATCH_MAX_BYTES": "1\n2",
            "BATCH_MAX_LINES": "0",
            "TIMESTAMP_MAX_AGE_S": "a\x85b",
            "TIMESTAMP_MAX_AHEAD_S": "-1",
            "BUFFER_BUDGET_BYTES": "1",
            "CLIENT_BUDGET_BYTES": "1\n2",
            "PARTS_IN_FLIGHT": "65",
            "COMPLETIONS_IN_FLIGHT": "1\n2",
            "ACCESS_LOG": "2\n",
            "CHECKPOINT_S": "1\n2",
            "LEASE_S": "0",
            "RECOVERY_INTERVAL_S": "x\ny",
            "ACK": "durable\nx",
            "DURABLE_TIMEOUT_S": "1\u2028x",
            "S3_SSE": "AES256\nx",
            "S3_SSE_KMS_KEY_ID": "alias/a\nb",
        }
        for variable, value in bad.items():
            self.assertConfigError(dict(BASE, **{variable: value}), variable)

    def test_same_words_for_malformed_and_out_of_range(self) -> None:
        """
        Every setting that checks its text refuses it as ``{VAR}: must be {what},
        got {text!r}``, with the same ``what`` (the allowed values or range) whether
        the text is no number at all or a number out of range: QUEUE_TIMEOUT_MIN=0
        and 0.001 read alike.
        """
        from loghandler.config import SETTINGS

        texts = ("x!", "0", "0.001", "-1", "1.5", "1e999", "99999999999", "2")
        checked = set()
        for setting in SETTINGS:
            if setting.secret:
                continue
            refusals = set()
            for text in texts:
                try:
                    setting.parse(setting.env, text)
                except ConfigError as e:
                    message = str(e)
                    self.assertRegex(message, r"^%s: must be .+, got %s$" % (setting.env, re.escape(repr(text))))
                    refusals.add(message[: message.rindex(", got ")])
            if refusals:
                self.assertEqual(len(refusals), 1, refusals)
                checked.add(setting.env)
        self.assertLessEqual(
            {"PORT", "QUEUE_TIMEOUT_MIN", "NO_UPLOAD", "ACCESS_LOG", "WORKERS", "CHECKPOINT_S",
             "SHUTDOWN_TIMEOUT_S", "ADDR", "AWS_BUCKET", "AWS_ENDPOINT_URL", "STORAGE", "ACK"},
            checked,
        )

    def test_config_error_is_value_error(self) -> None:
        """ConfigError is a ValueError."""
        self.assertTrue(issubclass(ConfigError, ValueError))


class BatchSettingsTests(SynchronousTestCase):
    """
    BATCH_MAX_BYTES and BATCH_MAX_LINES (batch ingest, issue 8): good values parsed,
    each bad one refused in one line naming its variable; --batch-max-bytes and
    --batch-max-lines mirror them.
    """

    assertConfigError = ErrorTests.assertConfigError

    def test_values_parsed(self) -> None:
        """Both fill their fields; the bounds themselves are taken."""
        config = from_environ(dict(BASE, BATCH_MAX_BYTES=" 256 ", BATCH_MAX_LINES="1"))
        self.assertEqual((config.batch_max_bytes, config.batch_max_lines), (256, 1))
        config = from_environ(
            dict(BASE, BATCH_MAX_BYTES=str(64 * MiB), BATCH_MAX_LINES="100000")
        )
        self.assertEqual((config.batch_max_bytes, config.batch_max_lines), (64 * MiB, 100_000))

    def test_bytes_bounds(self) -> None:
        """BATCH_MAX_BYTES below 256, above 64 MiB, or not an integer is refused."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, BATCH_MAX_BYTES="255"), "BATCH_MAX_BYTES"),
            "BATCH_MAX_BYTES: must be an integer from 256 to 67108864, got '255'",
        )
        for text in (str(64 * MiB + 1), "-1", "1.5", "1MiB"):
            self.assertConfigError(dict(BASE, BATCH_MAX_BYTES=text), "BATCH_MAX_BYTES", text)

    def test_lines_bounds(self) -> None:
        """BATCH_MAX_LINES below 1, above 100000, or not an integer is refused."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, BATCH_MAX_LINES="0"), "BATCH_MAX_LINES"),
            "BATCH_MAX_LINES: must be an integer from 1 to 100000, got '0'",
        )
        for text in ("100001", "-5", "ten"):
            self.assertConfigError(dict(BASE, BATCH_MAX_LINES=text), "BATCH_MAX_LINES", text)

    def test_bytes_at_most_half_the_budget(self) -> None:
        """A batch must fit in half the buffer budget, or every batch could get 503."""
        environ = dict(BASE, BUFFER_BUDGET_BYTES=str(20 * MiB))
        self.assertEqual(
            from_environ(dict(environ, BATCH_MAX_BYTES=str(10 * MiB))).batch_max_bytes,
            10 * MiB,
        )
        self.assertEqual(
            self.assertConfigError(
                dict(environ, BATCH_MAX_BYTES=str(10 * MiB + 1)), "BATCH_MAX_BYTES"
            ),
            "BATCH_MAX_BYTES: must be at most half of BUFFER_BUDGET_BYTES (%d), got %d"
            % (10 * MiB, 10 * MiB + 1),
        )

    def test_empty_means_default(self) -> None:
        """Empty values are the defaults."""
        self.assertEqual(
            from_environ(dict(BASE, BATCH_MAX_BYTES="", BATCH_MAX_LINES=" ")), from_environ(BASE)
        )

    def test_options(self) -> None:
        """--batch-max-bytes and --batch-max-lines give their variables; help shows defaults."""
        from loghandler.config import SETTINGS

        options = _tap().Options()
        options.parseOptions(["--batch-max-bytes", "4096", "--batch-max-lines", "10"])
        self.assertEqual(
            options.overrides(), {"BATCH_MAX_BYTES": "4096", "BATCH_MAX_LINES": "10"}
        )
        shown = {s.env: s.default_text for s in SETTINGS}
        self.assertEqual(
            (shown["BATCH_MAX_BYTES"], shown["BATCH_MAX_LINES"]), ("1048576", "1000")
        )


class CrashSettingsTests(SynchronousTestCase):
    """
    The settings of DESIGN.md section 6: CHECKPOINT_S, LEASE_S, RECOVERY_INTERVAL_S,
    ACK and DURABLE_TIMEOUT_S; good values parsed, each bad one refused in one line
    naming its variable.
    """

    assertConfigError = ErrorTests.assertConfigError

    def test_values_parsed(self) -> None:
        """Each variable fills its field; ACK is taken in any case and stored lower case."""
        config = from_environ(
            dict(
                BASE,
                CHECKPOINT_S="2.5",
                LEASE_S=" 5 ",
                RECOVERY_INTERVAL_S="60",
                ACK=" Durable ",
                DURABLE_TIMEOUT_S="0.5",
            )
        )
        self.assertEqual(
            (
                config.checkpoint_s,
                config.lease_s,
                config.recovery_interval_s,
                config.ack,
                config.durable_timeout_s,
            ),
            (2.5, 5.0, 60.0, "durable", 0.5),
        )

    def test_ack_modes(self) -> None:
        """ACK takes accepted and durable, in any case."""
        for text in ("accepted", "ACCEPTED", "durable", "Durable"):
            self.assertEqual(from_environ(dict(BASE, ACK=text)).ack, text.lower(), text)

    def test_ack_unknown(self) -> None:
        """ACK=sync, ACK=1 and ACK=durably are refused, naming ACK and both modes."""
        self.assertEqual(
            self.assertConfigError(dict(BASE, ACK="sync"), "ACK"),
            "ACK: must be 'accepted' or 'durable', got 'sync'",
        )
        for text in ("1", "durably", "accepted durable"):
            self.assertConfigError(dict(BASE, ACK=text), "ACK", repr(text))

    def test_checkpoint_off(self) -> None:
        """CHECKPOINT_S=0 (or 0.0) turns checkpoints off: 0.0."""
        for text in ("0", "0.0", " 0 "):
            self.assertEqual(from_environ(dict(BASE, CHECKPOINT_S=text)).checkpoint_s, 0.0, text)

    def test_checkpoint_bounds(self) -> None:
        """
        CHECKPOINT_S takes 0.1 and 86400; just outside, negatives, nan, inf and text
        are refused.
        """
        self.assertEqual(from_environ(dict(BASE, CHECKPOINT_S="0.1")).checkpoint_s, 0.1)
        self.assertEqual(from_environ(dict(BASE, CHECKPOINT_S="86400")).checkpoint_s, 86400.0)
        self.assertEqual(
            self.assertConfigError(dict(BASE, CHECKPOINT_S="0.05"), "CHECKPOINT_S"),
            "CHECKPOINT_S: must be a number of seconds from 0.1 to 86400, or 0 (off), got '0.05'",
        )
        for text in ("86400.5", "-1", "nan", "inf", "-inf", "1e999"):
            self.assertConfigError(dict(BASE, CHECKPOINT_S=text), "CHECKPOINT_S", repr(text))
        self.assertEqual(
            self.assertConfigError(dict(BASE, CHECKPOINT_S="ten"), "CHECKPOINT_S"),
            "CHECKPOINT_S: must be a number of seconds from 0.1 to 86400, or 0 (off), got 'ten'",
        )

    def test_lease_bounds(self) -> None:
        """LEASE_S takes 1 to 3600; 0 (no off), 0.5, 3601, nan and text are refused."""
        self.assertEqual(from_environ(dict(BASE, LEASE_S="1")).lease_s, 1.0)
        self.assertEqual(from_environ(dict(BASE, LEASE_S="3600")).lease_s, 3600.0)
        self.assertEqual(
            self.assertConfigError(dict(BASE, LEASE_S="0"), "LEASE_S"),
            "LEASE_S: must be a number of seconds from 1 to 3600, got '0'",
        )
        for text in ("0.5", "3601", "-10", "nan", "inf", "x"):
            self.assertConfigError(dict(BASE, LEASE_S=text), "LEASE_S", repr(text))

    def test_recovery_interval_bounds(self) -> None:
        """RECOVERY_INTERVAL_S takes 1 to 86400; 0, 0.9, 86401, inf and text are refused."""
        self.assertEqual(
            from_environ(dict(BASE, RECOVERY_INTERVAL_S="1")).recovery_interval_s, 1.0
        )
        self.assertEqual(
            from_environ(dict(BASE, RECOVERY_INTERVAL_S="86400")).recovery_interval_s, 86400.0
        )
        self.assertEqual(
            self.assertConfigError(dict(BASE, RECOVERY_INTERVAL_S="86401"), "RECOVERY_INTERVAL_S"),
            "RECOVERY_INTERVAL_S: must be a number of seconds from 1 to 86400, got '86401'",
        )
        for text in ("0", "0.9", "-1", "inf", "nan", "soon"):
            self.assertConfigError(
                dict(BASE, RECOVERY_INTERVAL_S=text), "RECOVERY_INTERVAL_S", repr(text)
            )

    def test_durable_timeout_bounds(self) -> None:
        """DURABLE_TIMEOUT_S takes 0.1 to 3600; 0, 0.09, 3600.1, nan and text are refused."""
        self.assertEqual(from_environ(dict(BASE, DURABLE_TIMEOUT_S="0.1")).durable_timeout_s, 0.1)
        self.assertEqual(
            from_environ(dict(BASE, DURABLE_TIMEOUT_S="3600")).durable_timeout_s, 3600.0
        )
        self.assertEqual(
            self.assertConfigError(dict(BASE, DURABLE_TIMEOUT_S="0"), "DURABLE_TIMEOUT_S"),
            "DURABLE_TIMEOUT_S: must be a number of seconds from 0.1 to 3600, got '0'",
        )
        for text in ("0.09", "3600.1", "-1", "nan", "inf", "x"):
            self.assertConfigError(
                dict(BASE, DURABLE_TIMEOUT_S=text), "DURABLE_TIMEOUT_S", repr(text)
            )

    def test_empty_means_default(self) -> None:
        """
        An empty CHECKPOINT_S, LEASE_S, RECOVERY_INTERVAL_S, ACK or DURABLE_TIMEOUT_S
        is the default.
        """
        config = from_environ(
            dict(
                BASE,
                CHECKPOINT_S="",
                LEASE_S=" ",
                RECOVERY_INTERVAL_S="",
                ACK="",
                DURABLE_TIMEOUT_S="",
            )
        )
        self.assertEqual(config, from_environ(BASE))

    def test_options(self) -> None:
        """
        --checkpoint-s, --lease-s, --recovery-interval-s, --ack and --durable-timeout-s
        give their variables.
        """
        options = _tap().Options()
        options.parseOptions(
            [
                "--checkpoint-s", "1",
                "--lease-s", "2",
                "--recovery-interval-s", "3",
                "--ack", "durable",
                "--durable-timeout-s", "4",
            ]
        )
        self.assertEqual(
            options.overrides(),
            {
                "CHECKPOINT_S": "1",
                "LEASE_S": "2",
                "RECOVERY_INTERVAL_S": "3",
                "ACK": "durable",
                "DURABLE_TIMEOUT_S": "4",
            },
        )

    def test_defaults_shown(self) -> None:
        """``--help`` shows the defaults as the variables take them."""
        from loghandler.config import SETTINGS

        shown = {s.env: s.default_text for s in SETTINGS}
        self.assertEqual(
            [
                shown[name]
                for name in (
                    "CHECKPOINT_S", "LEASE_S", "RECOVERY_INTERVAL_S", "ACK", "DURABLE_TIMEOUT_S"
                )
            ],
            ["10", "10", "30", "accepted", "10"],
        )


class TapOptionsTests(SynchronousTestCase):
    """``twistd loghandler`` options map onto the environment variables."""

    def test_overrides(self) -> None:
        """--port 9000 --no-upload gives exactly PORT=9000 and NO_UPLOAD=1."""
        options = _tap().Options()
        options.parseOptions(["--port", "9000", "--no-upload"])
        self.assertEqual(options.overrides(), {"PORT": "9000", "NO_UPLOAD": "1"})

    def test_no_options_no_overrides(self) -> None:
        """With no options there are no overrides."""
        options = _tap().Options()
        options.parseOptions([])
        self.assertEqual(options.overrides(), {})

    def test_option_names(self) -> None:
        """Options mirror variable names: --queue-timeout-min and --access-log exist."""
        options = _tap().Options()
        options.parseOptions(
            ["--queue-timeout-min", "0.05", "--access-log", "--completions-in-flight", "8"]
        )
        self.assertEqual(
            options.overrides(),
            {"QUEUE_TIMEOUT_MIN": "0.05", "ACCESS_LOG": "1", "COMPLETIONS_IN_FLIGHT": "8"},
        )

    def test_no_secret_options(self) -> None:
        """There is no option for AWS_ACCESS_KEY or AWS_ACCESS_SECRET; giving one is a usage error."""
        tap = _tap()
        names = {entry[0] for entry in tap.Options.optParameters} | {
            entry[0] for entry in tap.Options.optFlags
        }
        self.assertIn("port", names)
        self.assertNotIn("aws-access-key", names)
        self.assertNotIn("aws-access-secret", names)
        for argument in ("--aws-access-key", "--aws-access-secret"):
            self.assertRaises(usage.UsageError, tap.Options().parseOptions, [argument, "x"])

    def test_load_config_from_options_and_environ(self) -> None:
        """load_config combines the environment with the options, the options winning."""
        tap = _tap()
        options = tap.Options()
        options.parseOptions(["--port", "9000", "--no-upload"])
        config = tap.load_config(options, {"PORT": "1", "ADDR": "127.0.0.1"})
        self.assertEqual(
            (config.port, config.no_upload, config.addr), (9000, True, "127.0.0.1")
        )

    def test_load_config_error_exits(self) -> None:
        """A bad PORT option exits with code 2 and writes one line naming PORT to stderr."""
        tap = _tap()
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        options = tap.Options()
        options.parseOptions(["--port", "abc"])
        with self.assertRaises(SystemExit) as raised:
            tap.load_config(options, dict(BASE))
        self.assertEqual(raised.exception.code, 2)
        self.assertEqual(stderr.getvalue(), "loghandler: PORT: must be an integer from 0 to 65535, got 'abc'\n")

    def test_load_config_environ_error_exits(self) -> None:
        """A bad PORT in the environment exits with code 2 and one stderr line."""
        tap = _tap()
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        options = tap.Options()
        options.parseOptions([])
        with self.assertRaises(SystemExit) as raised:
            tap.load_config(options, dict(BASE, PORT="70000"))
        self.assertEqual(raised.exception.code, 2)
        output = stderr.getvalue()
        self.assertTrue(output.startswith("loghandler: PORT: "), output)
        self.assertEqual(output.count("\n"), 1)
        self.assertTrue(output.endswith("\n"))


class HelpTests(SynchronousTestCase):
    """``twistd loghandler --help`` shows each variable's name and default."""

    def test_defaults_shown(self) -> None:
        """Defaults are written as the variable takes them (minutes, 0/1, bytes)."""
        from loghandler.config import SETTINGS

        shown = {s.env: s.default_text for s in SETTINGS}
        self.assertEqual(shown["PORT"], "8902")
        self.assertEqual(shown["QUEUE_TIMEOUT_MIN"], "60")
        self.assertEqual(shown["NO_UPLOAD"], "0")
        self.assertEqual(shown["PART_SIZE_BYTES"], str(5 * MiB))
        self.assertEqual(shown["AWS_BUCKET"], "")
        self.assertEqual(shown["COMPLETIONS_IN_FLIGHT"], "4")

    def test_help_text(self) -> None:
        """The option help names the variable and its default."""
        from loghandler.tap import Options

        text = str(Options())
        self.assertIn("--queue-timeout-min=", text)
        self.assertIn("[PORT,", text)
        self.assertIn("default 8902]", " ".join(text.split()))
        self.assertIn("--completions-in-flight=", text)
        self.assertIn("[COMPLETIONS_IN_FLIGHT, default 4]", " ".join(text.split()))
        self.assertNotIn("--aws-access-secret", text)


class CheckedValueTests(SynchronousTestCase):
    """Values that parse but cannot work stop the start with one line too."""

    def assertOneLineError(self, environ: dict[str, str], variable: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            from_environ(dict(BASE, **environ))
        message = str(caught.exception)
        self.assertTrue(message.startswith(variable + ":"), message)
        self.assertNotIn("\n", message)

    def test_addr_not_an_ip(self) -> None:
        """ADDR must be an IP address; IPv6 is fine."""
        self.assertOneLineError({"ADDR": "999.1.1.1"}, "ADDR")
        self.assertOneLineError({"ADDR": "my host"}, "ADDR")
        self.assertEqual(from_environ(dict(BASE, ADDR="::")).addr, "::")

    def test_endpoint_malformed(self) -> None:
        """A malformed endpoint URL is named, not a traceback."""
        self.assertOneLineError({"AWS_ENDPOINT_URL": "http://[::1"}, "AWS_ENDPOINT_URL")
        self.assertOneLineError({"AWS_ENDPOINT_URL": "http://127.0.0.1:abc"}, "AWS_ENDPOINT_URL")

    def test_queue_timeout_overflow(self) -> None:
        """QUEUE_TIMEOUT_MIN so large that its seconds overflow is refused."""
        self.assertOneLineError({"QUEUE_TIMEOUT_MIN": "1e308"}, "QUEUE_TIMEOUT_MIN")

    def test_budget_below_four_parts(self) -> None:
        """The buffer budget must hold at least four parts."""
        self.assertOneLineError(
            {"BUFFER_BUDGET_BYTES": str(20 * MiB - 1)}, "BUFFER_BUDGET_BYTES"
        )
        self.assertEqual(
            from_environ(dict(BASE, BUFFER_BUDGET_BYTES=str(20 * MiB))).buffer_budget_bytes,
            20 * MiB,
        )

    def test_bucket_name(self) -> None:
        """AWS_BUCKET must follow S3's naming rules."""
        for bad in ("bad bucket name", "bkt/../xyz", "Logs", "ab", "a..b", "-logs", "x" * 64):
            self.assertOneLineError({"AWS_BUCKET": bad}, "AWS_BUCKET")
        self.assertEqual(from_environ(dict(BASE, AWS_BUCKET="my.logs-1")).aws_bucket, "my.logs-1")

    def test_queue_timeout_minimum(self) -> None:
        """QUEUE_TIMEOUT_MIN below 0.01 (0.6 s) is refused; 0.01 is accepted."""
        self.assertOneLineError({"QUEUE_TIMEOUT_MIN": "0.0002"}, "QUEUE_TIMEOUT_MIN")
        self.assertAlmostEqual(
            from_environ(dict(BASE, QUEUE_TIMEOUT_MIN="0.01")).queue_timeout_s, 0.6
        )


class EncryptionSettingTests(SynchronousTestCase):
    """S3_SSE and S3_SSE_KMS_KEY_ID: server-side encryption of the objects written."""

    def test_unset(self) -> None:
        """Unset, both are None: the bucket's default encryption applies."""
        config = from_environ(BASE)
        self.assertEqual((config.s3_sse, config.s3_sse_kms_key_id), (None, None))

    def test_values(self) -> None:
        """AES256 alone; aws:kms alone (S3's aws/s3 key) or with a key ID, ARN or alias."""
        self.assertEqual(from_environ(dict(BASE, S3_SSE=" AES256 ")).s3_sse, "AES256")
        config = from_environ(dict(BASE, S3_SSE="aws:kms"))
        self.assertEqual((config.s3_sse, config.s3_sse_kms_key_id), ("aws:kms", None))
        for key in (
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234abcd12ab34cd56ef1234567890ab",
            "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "alias/loghandler",
            "arn:aws:kms:eu-west-1:111122223333:alias/loghandler",
        ):
            config = from_environ(dict(BASE, S3_SSE="aws:kms", S3_SSE_KMS_KEY_ID=key))
            self.assertEqual((config.s3_sse, config.s3_sse_kms_key_id), ("aws:kms", key))

    def test_options(self) -> None:
        """--s3-sse and --s3-sse-kms-key-id override the variables."""
        tap = _tap()
        options = tap.Options()
        options.parseOptions(["--s3-sse", "aws:kms", "--s3-sse-kms-key-id", "alias/x"])
        config = tap.load_config(options, dict(BASE, S3_SSE="AES256"))
        self.assertEqual((config.s3_sse, config.s3_sse_kms_key_id), ("aws:kms", "alias/x"))


class MakeStoreTests(SynchronousTestCase):
    """
    ``loghandler.tap.make_store`` wires the configuration into the store: the S3
    client from ``build_s3_client`` with ``aws_credentials``, and the settings of
    the S3 writer (``COMPLETIONS_IN_FLIGHT``, the shared memory budget).  The client
    and credentials functions are replaced here: only the wiring is under test.
    """

    def replace(self, module_name: str, name: str, value: object) -> None:
        """
        Set ``module_name.name`` to ``value`` for this test; a module that cannot be
        imported is stood in for by an empty one.
        """
        import importlib

        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = ModuleType(module_name)
            self.patch(sys, "modules", dict(sys.modules, **{module_name: module}))
        missing = object()
        old = getattr(module, name, missing)
        setattr(module, name, value)

        def restore() -> None:
            if old is missing:
                delattr(module, name)
            else:
                setattr(module, name, old)

        self.addCleanup(restore)

    def test_s3_store(self) -> None:
        """
        The S3 store gets the client built for the bucket, region, endpoint and the
        static credentials, the shared budget, and COMPLETIONS_IN_FLIGHT merge slots.
        """
        from loghandler.budget import MemoryBudget
        from loghandler.storage.memory import MemoryStore
        from loghandler.storage.s3.writer import S3ObjectStore

        tap = _tap()
        built: list[tuple[object, dict[str, object]]] = []
        client = MemoryStore()  # stands in for the S3 client
        credentials = object()
        self.replace(
            "loghandler.storage.s3.credentials",
            "aws_credentials",
            lambda key, secret: credentials if (key, secret) == ("AKID", "sekrit") else None,
        )

        def build_s3_client(reactor: object, **kwargs: object) -> object:
            built.append((reactor, kwargs))
            return client

        self.replace("loghandler.storage.s3.client", "build_s3_client", build_s3_client)
        config = from_environ(
            dict(
                BASE,
                AWS_ENDPOINT_URL="http://127.0.0.1:5000",
                AWS_ACCESS_KEY="AKID",
                AWS_ACCESS_SECRET="sekrit",
                COMPLETIONS_IN_FLIGHT="7",
            )
        )
        reactor = object()
        budget = MemoryBudget(64 * MiB)
        store, background = tap.make_store(config, reactor, budget)
        self.assertIsInstance(store, S3ObjectStore)
        from loghandler.storage.s3.recovery import RecoveryService

        (recovery,) = background
        self.assertIsInstance(recovery, RecoveryService)
        self.assertEqual(recovery.step, config.recovery_interval_s)
        assert store.lease is not None
        self.assertEqual(store.lease.writer_id, store.writer_id)
        self.assertEqual(store.lease.lease_s, config.lease_s)
        self.assertEqual(
            built,
            [
                (
                    reactor,
                    dict(
                        bucket="logs",
                        region="eu-west-1",
                        endpoint_url="http://127.0.0.1:5000",
                        credentials=credentials,
                        encryption=None,
                    ),
                )
            ],
        )
        self.assertIs(store.client, client)
        self.assertIs(store.clock, reactor)
        self.assertEqual(store.merge_slots.limit, 7)
        self.assertIs(store.merger.budget, budget)

    def test_s3_encryption(self) -> None:
        """
        S3_SSE and S3_SSE_KMS_KEY_ID reach the S3 client as its ServerSideEncryption.
        """
        from loghandler.budget import MemoryBudget
        from loghandler.storage.memory import MemoryStore
        from loghandler.storage.s3.client import ServerSideEncryption

        tap = _tap()
        built: list[dict[str, object]] = []
        self.replace(
            "loghandler.storage.s3.credentials", "aws_credentials", lambda key, secret: object()
        )

        def build_s3_client(reactor: object, **kwargs: object) -> object:
            built.append(kwargs)
            return MemoryStore()

        self.replace("loghandler.storage.s3.client", "build_s3_client", build_s3_client)
        config = from_environ(dict(BASE, S3_SSE="aws:kms", S3_SSE_KMS_KEY_ID="alias/logs"))
        tap.make_store(config, object(), MemoryBudget(64 * MiB))
        self.assertEqual(
            [b["encryption"] for b in built], [ServerSideEncryption("aws:kms", "alias/logs")]
        )

    def test_taken_over_exits_at_once(self) -> None:
        """
        A process whose lease recovery took over logs a critical line and exits at
        once with status 75, without a flush (os._exit, no reactor shutdown).
        """
        tap = _tap()
        exits: list[int] = []
        self.patch(tap.os, "_exit", exits.append)
        from twisted.logger import LogLevel, capturedLogs

        with capturedLogs() as events:
            tap._taken_over()
        self.assertEqual(exits, [75])
        (event,) = events
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertIn("without a flush", event["log_format"])

    def test_credentials_error_exits(self) -> None:
        """An error from the credential chain exits with code 2 and its one line."""
        tap = _tap()

        def refuse(key: object, secret: object) -> object:
            raise ValueError("no AWS credentials: set AWS_ACCESS_KEY and AWS_ACCESS_SECRET")

        self.replace("loghandler.storage.s3.credentials", "aws_credentials", refuse)
        self.replace("loghandler.storage.s3.client", "build_s3_client", lambda *a, **k: None)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        from loghandler.budget import MemoryBudget

        with self.assertRaises(SystemExit) as raised:
            tap.make_store(from_environ(BASE), object(), MemoryBudget(64 * MiB))
        self.assertEqual(raised.exception.code, 2)
        self.assertEqual(
            stderr.getvalue(),
            "loghandler: no AWS credentials: set AWS_ACCESS_KEY and AWS_ACCESS_SECRET\n",
        )

    def test_no_upload_discards(self) -> None:
        """NO_UPLOAD=1 gives the discard store, which needs no bucket or credentials."""
        from loghandler.budget import MemoryBudget
        from loghandler.storage.discard import DiscardStore

        store, background = _tap().make_store(
            from_environ({"NO_UPLOAD": "1"}), object(), MemoryBudget(MiB)
        )
        self.assertIsInstance(store, DiscardStore)
        self.assertEqual(background, [])


AZURE = {
    "STORAGE": "azure",
    "AZURE_ACC": "devstoreaccount1",
    "AZURE_KEY": "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==",
    "AZURE_CONTAINER": "logs",
}


class AzureSettingsTests(SynchronousTestCase):
    """STORAGE=azure and its settings."""

    assertConfigError = ErrorTests.assertConfigError

    def test_shared_key(self) -> None:
        """Account, key and container; no AWS setting needed; 50,000 blocks by default."""
        config = from_environ(AZURE)
        self.assertEqual(
            (config.storage, config.azure_acc, config.azure_container, config.azure_max_blocks),
            ("azure", "devstoreaccount1", "logs", 50_000),
        )
        self.assertEqual(config.azure_key, AZURE["AZURE_KEY"])

    def test_checkpoint_default_is_30_s(self) -> None:
        """
        Unset, CHECKPOINT_S is 30 s with STORAGE=azure (a member and a block per
        checkpoint), 10 s with aws; set, it is what it says.
        """
        self.assertEqual(from_environ(AZURE).checkpoint_s, 30.0)
        self.assertEqual(from_environ(BASE).checkpoint_s, 10.0)
        self.assertEqual(from_environ(dict(AZURE, CHECKPOINT_S="10")).checkpoint_s, 10.0)

    def test_account_without_key_uses_identity(self) -> None:
        """AZURE_ACC alone is accepted (DefaultAzureCredential)."""
        environ = {k: v for k, v in AZURE.items() if k != "AZURE_KEY"}
        self.assertIsNone(from_environ(environ).azure_key)

    def test_connection_string_alone(self) -> None:
        """AZURE_CONNECTION_STRING replaces AZURE_ACC and AZURE_KEY."""
        config = from_environ(
            {
                "STORAGE": "azure",
                "AZURE_CONTAINER": "logs",
                "AZURE_CONNECTION_STRING": "AccountName=a1;AccountKey=a2V5;"
                "BlobEndpoint=http://127.0.0.1:10000/a1;",
            }
        )
        self.assertIn("BlobEndpoint", config.azure_connection_string or "")

    def test_missing(self) -> None:
        """Each required setting missing is named, in one line."""
        for missing, variable in (
            ("AZURE_CONTAINER", "AZURE_CONTAINER"),
            ("AZURE_ACC", "AZURE_ACC"),
        ):
            environ = {k: v for k, v in AZURE.items() if k != missing}
            if missing == "AZURE_ACC":
                del environ["AZURE_KEY"]
            self.assertConfigError(environ, variable, "required with STORAGE=azure")

    def test_no_upload_needs_nothing(self) -> None:
        """NO_UPLOAD=1 with STORAGE=azure needs no Azure setting."""
        self.assertTrue(from_environ({"STORAGE": "azure", "NO_UPLOAD": "1"}).no_upload)

    def test_malformed(self) -> None:
        """Malformed values are refused naming the variable; secrets are never quoted."""
        for variable, value, contains in (
            ("AZURE_ACC", "Dev_Account", "must be a storage account name"),
            ("AZURE_ACC", "ab", "3-24"),
            ("AZURE_CONTAINER", "Logs", "must be a container name"),
            ("AZURE_CONTAINER", "a--b", "single '-'"),
            ("AZURE_CONTAINER", "-ab", "must be a container name"),
            ("AZURE_KEY", "not base64!!", "in base64"),
            ("AZURE_BLOB_ENDPOINT", "127.0.0.1:10000", "http:// or https://"),
            ("AZURE_MAX_BLOCKS", "50001", "from 2 to 50000"),
            ("AZURE_MAX_BLOCKS", "1", "from 2 to 50000"),
        ):
            message = self.assertConfigError(dict(AZURE, **{variable: value}), variable, contains)
            if variable == "AZURE_KEY":
                self.assertNotIn(value, message)

    def test_connection_string_malformed_is_not_quoted(self) -> None:
        """A malformed connection string is named, its secret never shown."""
        environ = {
            "STORAGE": "azure",
            "AZURE_CONTAINER": "logs",
            "AZURE_CONNECTION_STRING": "secretsecretsecret",
        }
        message = self.assertConfigError(environ, "AZURE_CONNECTION_STRING", "must be an Azure")
        self.assertNotIn("secretsecret", message)

    def test_connection_string_endpoint_scheme(self) -> None:
        """A BlobEndpoint that is not http(s) is refused (the SDK would take it)."""
        environ = {
            "STORAGE": "azure",
            "AZURE_CONTAINER": "logs",
            "AZURE_CONNECTION_STRING": "AccountName=a1;AccountKey=a2V5;BlobEndpoint=ftp://x",
        }
        message = self.assertConfigError(environ, "AZURE_CONNECTION_STRING", "http://")
        self.assertNotIn("a2V5", message)

    def test_blank_secrets_are_errors(self) -> None:
        """
        AZURE_KEY or AZURE_CONNECTION_STRING set but blank is refused (unset would
        silently mean DefaultAzureCredential); a connection string's AccountKey
        must be base64, as AZURE_KEY must.
        """
        for variable in ("AZURE_KEY", "AZURE_CONNECTION_STRING"):
            self.assertConfigError(dict(AZURE, **{variable: " "}), variable, "set but empty")
        environ = {
            "STORAGE": "azure",
            "AZURE_CONTAINER": "logs",
            "AZURE_CONNECTION_STRING": "AccountName=a1;AccountKey=not*base64",
        }
        message = self.assertConfigError(environ, "AZURE_CONNECTION_STRING", "AccountKey must be base64")
        self.assertNotIn("not*base64", message)

    def test_connection_string_and_key_conflict(self) -> None:
        """A connection string and an account key together are refused."""
        self.assertConfigError(
            dict(AZURE, AZURE_CONNECTION_STRING="AccountName=a1;AccountKey=a2V5"),
            "AZURE_ACC",
            "either AZURE_CONNECTION_STRING or AZURE_ACC/AZURE_KEY",
        )

    def test_part_size_capped(self) -> None:
        """A part is one append block: over 96 MiB is refused with STORAGE=azure only."""
        self.assertConfigError(
            dict(AZURE, PART_SIZE_BYTES=str(96 * MiB + 1)), "PART_SIZE_BYTES", "STORAGE=azure"
        )
        environ = dict(BASE, PART_SIZE_BYTES=str(97 * MiB), BUFFER_BUDGET_BYTES=str(1024 * MiB))
        self.assertEqual(from_environ(environ).part_size, 97 * MiB)


class MakeAzureStoreTests(SynchronousTestCase):
    """
    ``loghandler.tap.make_store`` with ``STORAGE=azure``: the real azure-storage-blob
    ContainerClient is built (it sends nothing until a call), with the SDK's retries
    off, for the endpoint and credential the settings name.
    """

    def make(self, environ: dict[str, str]) -> object:
        store, background = _tap().make_store(from_environ(environ), object(), None)
        self.assertEqual(background, [])
        return store

    def test_shared_key(self) -> None:
        """AZURE_ACC/AZURE_KEY at AZURE_BLOB_ENDPOINT: the container's URL, a shared key."""
        from loghandler.storage.azure.writer import AzureObjectStore

        store = self.make(dict(AZURE, AZURE_BLOB_ENDPOINT="http://127.0.0.1:10000/devstoreaccount1",
                               AZURE_MAX_BLOCKS="7"))
        assert isinstance(store, AzureObjectStore)
        sdk = store.client._container  # type: ignore[attr-defined]
        self.assertEqual(sdk.url, "http://127.0.0.1:10000/devstoreaccount1/logs")
        self.assertEqual(sdk.credential.account_name, "devstoreaccount1")
        self.assertEqual(sdk._config.retry_policy.total_retries, 0)
        self.assertEqual(store.max_blocks, 7)

    def test_default_endpoint_and_identity(self) -> None:
        """AZURE_ACC alone: https://{acc}.blob.core.windows.net and DefaultAzureCredential."""
        from azure.identity import DefaultAzureCredential

        environ = {k: v for k, v in AZURE.items() if k != "AZURE_KEY"}
        sdk = self.make(environ).client._container  # type: ignore[attr-defined]
        self.assertEqual(sdk.url, "https://devstoreaccount1.blob.core.windows.net/logs")
        self.assertIsInstance(sdk.credential, DefaultAzureCredential)

    def test_connection_string_refused_by_sdk(self) -> None:
        """A connection string the SDK refuses stops the start: one line, exit 2."""
        environ = {
            "STORAGE": "azure",
            "AZURE_CONTAINER": "logs",
            "AZURE_CONNECTION_STRING": "AccountKey=a2V5;BlobEndpoint=",
        }
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            self.make(environ)
        self.assertEqual(raised.exception.code, 2)
        (line,) = stderr.getvalue().splitlines()
        self.assertTrue(line.startswith("loghandler: AZURE_CONNECTION_STRING: "), line)
        self.assertNotIn("a2V5", line)


class ClientBudgetTests(SynchronousTestCase):
    """
    CLIENT_BUDGET_BYTES (issue 8, item 6): each client's share of the buffer budget;
    unset, a quarter of the budget (at least two parts and the largest batch, at
    most the budget); a bad value refused in one line naming the variable.
    """

    assertConfigError = ErrorTests.assertConfigError

    def test_default_a_quarter_of_the_budget(self) -> None:
        """Unset: 64 MiB of the default 256 MiB; it follows BUFFER_BUDGET_BYTES."""
        self.assertEqual(from_environ(BASE).client_budget_bytes, 64 * MiB)
        self.assertEqual(
            from_environ(dict(BASE, BUFFER_BUDGET_BYTES=str(1024 * MiB))).client_budget_bytes,
            256 * MiB,
        )
        self.assertEqual(
            from_environ(dict(BASE, CLIENT_BUDGET_BYTES=" ")).client_budget_bytes, 64 * MiB
        )

    def test_default_at_least_two_parts_and_a_batch(self) -> None:
        """A small budget: the default share is two parts, or the largest batch."""
        environ = dict(BASE, BUFFER_BUDGET_BYTES=str(20 * MiB))
        self.assertEqual(from_environ(environ).client_budget_bytes, 10 * MiB)
        environ = dict(BASE, BUFFER_BUDGET_BYTES=str(40 * MiB), BATCH_MAX_BYTES=str(20 * MiB))
        self.assertEqual(from_environ(environ).client_budget_bytes, 20 * MiB)

    def test_value_parsed(self) -> None:
        """A value between its bounds is taken as it is."""
        config = from_environ(dict(BASE, CLIENT_BUDGET_BYTES=str(16 * MiB)))
        self.assertEqual(config.client_budget_bytes, 16 * MiB)
        config = from_environ(dict(BASE, CLIENT_BUDGET_BYTES=str(256 * MiB)))
        self.assertEqual(config.client_budget_bytes, 256 * MiB)

    def test_larger_than_the_budget(self) -> None:
        """Over BUFFER_BUDGET_BYTES is refused, naming both."""
        self.assertEqual(
            self.assertConfigError(
                dict(BASE, CLIENT_BUDGET_BYTES=str(256 * MiB + 1)), "CLIENT_BUDGET_BYTES"
            ),
            "CLIENT_BUDGET_BYTES: must be at most BUFFER_BUDGET_BYTES (%d), got %d"
            % (256 * MiB, 256 * MiB + 1),
        )

    def test_smaller_than_two_parts_or_a_batch(self) -> None:
        """Under 2 x PART_SIZE_BYTES or under BATCH_MAX_BYTES is refused."""
        self.assertConfigError(
            dict(BASE, CLIENT_BUDGET_BYTES=str(10 * MiB - 1)),
            "CLIENT_BUDGET_BYTES",
            "at least 2 x PART_SIZE_BYTES (%d)" % (10 * MiB),
        )
        self.assertConfigError(
            dict(BASE, CLIENT_BUDGET_BYTES=str(12 * MiB), BATCH_MAX_BYTES=str(13 * MiB)),
            "CLIENT_BUDGET_BYTES",
            "at least BATCH_MAX_BYTES",
        )

    def test_malformed(self) -> None:
        """Not an integer, or out of range, is refused in one line."""
        for text in ("64MiB", "-1", "1.5", "1\n2", "0"):
            self.assertConfigError(dict(BASE, CLIENT_BUDGET_BYTES=text), "CLIENT_BUDGET_BYTES")

    def test_option(self) -> None:
        """--client-budget-bytes gives the variable; --help shows the default."""
        from loghandler.config import SETTINGS

        options = _tap().Options()
        options.parseOptions(["--client-budget-bytes", "4096"])
        self.assertEqual(options.overrides(), {"CLIENT_BUDGET_BYTES": "4096"})
        shown = {s.env: s.default_text for s in SETTINGS}
        self.assertEqual(shown["CLIENT_BUDGET_BYTES"], "67108864")

    def test_workers(self) -> None:
        """
        With WORKERS=N each worker takes CLIENT_BUDGET_BYTES / N; the default and
        the lower bounds hold two parts and a batch for each worker.
        """
        from loghandler.config import worker_share

        config = from_environ(dict(BASE, WORKERS="4", CLIENT_BUDGET_BYTES=str(80 * MiB)))
        self.assertEqual(worker_share(config).client_budget_bytes, 20 * MiB)
        environ = dict(BASE, WORKERS="4", BUFFER_BUDGET_BYTES=str(80 * MiB))
        self.assertEqual(from_environ(environ).client_budget_bytes, 40 * MiB)
        self.assertConfigError(
            dict(environ, CLIENT_BUDGET_BYTES=str(40 * MiB - 1)),
            "CLIENT_BUDGET_BYTES",
            "at least 2 x PART_SIZE_BYTES for each of WORKERS=4 (%d)" % (40 * MiB),
        )


class ConnectionSettingsTests(SynchronousTestCase):
    """
    REQUEST_TIMEOUT_S and MAX_CONNECTIONS: parsed, bounded, refused in one line;
    MAX_CONNECTIONS divided among WORKERS; a share over RLIMIT_NOFILE warned about.
    """

    assertConfigError = ErrorTests.assertConfigError

    def test_defaults(self) -> None:
        """30 s; MAX_CONNECTIONS unset (derived per process at start)."""
        config = from_environ(BASE)
        self.assertEqual((config.request_timeout_s, config.max_connections), (30.0, None))

    def test_values(self) -> None:
        config = from_environ(dict(BASE, REQUEST_TIMEOUT_S="2.5", MAX_CONNECTIONS=" 100 "))
        self.assertEqual((config.request_timeout_s, config.max_connections), (2.5, 100))
        self.assertEqual(from_environ(dict(BASE, REQUEST_TIMEOUT_S="0")).request_timeout_s, 0.0)

    def test_bounds(self) -> None:
        self.assertEqual(
            self.assertConfigError(dict(BASE, REQUEST_TIMEOUT_S="0.5"), "REQUEST_TIMEOUT_S"),
            "REQUEST_TIMEOUT_S: must be a number of seconds from 1 to 3600, or 0 (off),"
            " got '0.5'",
        )
        self.assertEqual(
            self.assertConfigError(dict(BASE, MAX_CONNECTIONS="0"), "MAX_CONNECTIONS"),
            "MAX_CONNECTIONS: must be an integer from 1 to 1000000, got '0'",
        )

    def test_workers_share(self) -> None:
        """Each of WORKERS takes MAX_CONNECTIONS / WORKERS; fewer than WORKERS is refused."""
        from loghandler.config import worker_share

        config = from_environ(dict(BASE, WORKERS="4", MAX_CONNECTIONS="1000"))
        self.assertEqual(worker_share(config).max_connections, 250)
        self.assertIsNone(worker_share(from_environ(dict(BASE, WORKERS="4"))).max_connections)
        self.assertEqual(
            self.assertConfigError(
                dict(BASE, WORKERS="4", MAX_CONNECTIONS="3"), "MAX_CONNECTIONS"
            ),
            "MAX_CONNECTIONS: must be at least WORKERS (4; each worker takes"
            " MAX_CONNECTIONS / WORKERS), got 3",
        )

    def test_descriptors_short(self) -> None:
        """A share needing more descriptors than RLIMIT_NOFILE leaves is warned about."""
        from twisted.logger import capturedLogs

        tap = _tap()
        with capturedLogs() as events:
            tap._check_descriptors(768, lambda _: (1024, 4096))
            self.assertEqual(events, [])
            tap._check_descriptors(769, lambda _: (1024, 4096))
        (event,) = events
        self.assertEqual(
            (event["event"], event["max_connections"], event["soft"]),
            ("descriptors_short", 769, 1024),
        )
