"""
Tests for :mod:`loghandler.logs`: the JSON lines of ``twistd --logger
loghandler.logs.json_observer`` (time, level, namespace, message, the named fields,
values JSON cannot hold, failures, legacy events), a worker's events through the
supervisor, and that ``repr`` of the configuration hides the secrets.
"""

from __future__ import annotations

import enum
import io
import json
import sys
from typing import Any

from twisted.logger import ILogObserver, Logger, LogLevel, eventAsJSON, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.reflect import namedAny
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from loghandler.config import from_environ
from loghandler.logs import JSONLineObserver, event_as_json, json_observer

#: 2023-11-14T22:13:20.5Z
WHEN = 1_700_000_000.5


def logged(**fields: Any) -> dict[str, Any]:
    """The JSON line of one event logged at info with ``fields``, parsed."""
    events: list[dict[str, Any]] = []
    log = Logger(namespace="loghandler.test", observer=events.append)
    format = fields.pop("format", "text")
    log.info(format, **fields)
    events[0]["log_time"] = WHEN
    line = event_as_json(events[0])
    assert "\n" not in line
    return json.loads(line)  # type: ignore[no-any-return]


class Colour(enum.Enum):
    RED = "r"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


class Store:
    def __repr__(self) -> str:
        return "<Store s3>"


class JSONLineTests(SynchronousTestCase):
    """One JSON object per event, with the keys the module docstring lists."""

    def test_fields_and_message(self) -> None:
        """The message is formatted with its format specs; each field under its name."""
        line = logged(
            format="{key}: completed: {lines} lines in {seconds:.1f} s",
            key="chat/a",
            lines=3,
            seconds=0.4567,
            event="object_completed",
        )
        self.assertEqual(
            line,
            {
                "time": "2023-11-14T22:13:20.500Z",
                "level": "info",
                "namespace": "loghandler.test",
                "message": "chat/a: completed: 3 lines in 0.5 s",
                "key": "chat/a",
                "lines": 3,
                "seconds": 0.4567,
                "event": "object_completed",
            },
        )

    def test_levels(self) -> None:
        events: list[dict[str, Any]] = []
        log = Logger(namespace="n", observer=events.append)
        log.debug("d")
        log.warn("w")
        log.error("e")
        log.critical("c")
        levels = [json.loads(event_as_json(e))["level"] for e in events]
        self.assertEqual(levels, ["debug", "warn", "error", "critical"])

    def test_values_json_cannot_hold(self) -> None:
        """Written as text (or lists, names), never an exception, always valid JSON."""
        line = logged(
            raw=b"caf\xc3\xa9 \xff",
            names={"b"},
            ratio=float("nan"),
            big=float("inf"),
            severity=LogLevel.warn,
            colour=Colour.RED,
            thing=ValueError("bad value"),
            nested={"a": [1, (2, b"x")], 3: None},
            unprintable=Unprintable(),
        )
        self.assertEqual(line["raw"], "café \\xff")
        self.assertEqual(line["names"], ["b"])
        self.assertEqual((line["ratio"], line["big"]), ("nan", "inf"))
        self.assertEqual(line["severity"], "warn")
        self.assertEqual(line["colour"], "RED")
        self.assertEqual(line["thing"], "bad value")
        self.assertEqual(line["nested"], {"a": [1, [2, "x"]], "3": None})
        self.assertEqual(line["unprintable"], "<unprintable Unprintable>")

    def test_deep_nesting_is_text(self) -> None:
        deep: Any = []
        for _ in range(20):
            deep = [deep]
        value = logged(deep=deep)["deep"]
        depth = 0
        while isinstance(value, list):
            value, depth = value[0], depth + 1
        self.assertEqual(depth, 6)
        self.assertTrue(value.startswith("[[["), value)

    def test_reserved_names_get_an_underscore(self) -> None:
        """A field named like one of the line's own keys keeps its value, renamed."""
        line = logged(format="{time} {message}", time=5, message="m", namespace="x")
        self.assertEqual(line["message"], "5 m")
        self.assertEqual((line["time_"], line["message_"]), (5, "m"))
        self.assertEqual(line["namespace"], "loghandler.test")
        self.assertEqual(line["namespace_"], "x")

    def test_newlines_stay_in_one_line(self) -> None:
        line = logged(format="{text}", text="a\nb\r\nc\u2028")
        self.assertEqual(line["message"], "a\nb\r\nc\u2028")

    def test_failure(self) -> None:
        """A failure's type, message and traceback; the message is the event's text."""
        events: list[dict[str, Any]] = []
        log = Logger(namespace="n", observer=events.append)
        try:
            raise ValueError("broken")
        except ValueError:
            log.failure("{key}: merge failed", key="k")
        line = json.loads(event_as_json(events[0]))
        self.assertEqual(line["level"], "critical")
        self.assertEqual(line["message"], "k: merge failed")
        self.assertEqual(line["failure"]["type"], "builtins.ValueError")
        self.assertEqual(line["failure"]["message"], "broken")
        self.assertIn("Traceback", line["failure"]["traceback"])
        self.assertIn('raise ValueError("broken")', line["failure"]["traceback"])
        self.assertEqual(line["key"], "k")

    def test_legacy_event(self) -> None:
        """twisted.python.log events: their text, without the legacy keys as fields."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        legacy_log.msg("Site starting on", 8902, system="ctx")
        line = json.loads(event_as_json(events[-1]))
        self.assertEqual(line["message"], "Site starting on 8902")
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["system"], "ctx")
        self.assertEqual(set(line), {"time", "level", "namespace", "system", "message"}, line)

    def test_event_that_cannot_be_written(self) -> None:
        """An event whose keys JSON refuses still gives one error line."""

        class Broken(dict):  # type: ignore[type-arg]
            def items(self) -> Any:
                raise RuntimeError("gone")

        line = json.loads(event_as_json(Broken(log_format="x", log_time=WHEN)))
        self.assertEqual(line["level"], "error")
        self.assertEqual(line["event"], "log_event_unwritable")
        self.assertIn("gone", line["message"])


class ObserverTests(SynchronousTestCase):
    """The observer and the factory twistd's ``--logger`` calls."""

    def test_one_line_per_event_flushed(self) -> None:
        out = io.StringIO()
        observer = JSONLineObserver(out)
        log = Logger(namespace="n", observer=observer)
        log.info("one {n}", n=1)
        log.info("two {n}", n=2)
        lines = out.getvalue().splitlines()
        self.assertEqual([json.loads(line)["message"] for line in lines], ["one 1", "two 2"])
        self.assertTrue(out.getvalue().endswith("\n"))

    def test_twistd_logger_factory(self) -> None:
        """``--logger loghandler.logs.json_observer``: a callable giving an ILogObserver."""
        factory = namedAny("loghandler.logs.json_observer")
        observer = factory()
        self.assertTrue(verifyObject(ILogObserver, observer))
        self.assertIs(observer._out, sys.stdout)

    def test_factory_after_twistd_redirected_stdout(self) -> None:
        """Called once sys.stdout logs (twistd's redirect), it writes to the real one."""
        from twisted.logger import LoggingFile

        self.patch(sys, "stdout", LoggingFile(Logger()))
        self.assertIs(json_observer()._out, sys.__stdout__)  # type: ignore[attr-defined]


class WorkerEventTests(SynchronousTestCase):
    """A worker's event, through its JSON pipe and the supervisor, keeps its fields."""

    def test_worker_fields_in_the_supervisors_json(self) -> None:
        from loghandler.supervisor import WorkerProcess
        from loghandler.worker import preformatted

        pipe: list[str] = []
        worker_log = Logger(
            namespace="loghandler.stream.ObjectStream",
            observer=preformatted(lambda e: pipe.append(eventAsJSON(e))),  # type: ignore[arg-type]
        )
        worker_log.info(
            "{key}: {lines} lines in {seconds:.1f} s ({store})",
            key="chat/k",
            lines=7,
            seconds=1.25,
            store=Store(),
            event="object_completed",
        )
        republished: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(republished.append)
        self.addCleanup(globalLogPublisher.removeObserver, republished.append)
        WorkerProcess(None, 3).childDataReceived(1, pipe[0].encode() + b"\n")  # type: ignore[arg-type]
        line = json.loads(event_as_json(republished[-1]))
        self.assertEqual(line["message"], "chat/k: 7 lines in 1.2 s (<Store s3>)")
        self.assertEqual(line["namespace"], "loghandler.stream.ObjectStream")
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["system"], "worker 3")
        self.assertEqual(line["worker"], 3)
        self.assertEqual(
            (line["key"], line["lines"], line["seconds"], line["event"]),
            ("chat/k", 7, 1.25, "object_completed"),
        )
        self.assertEqual(line["store"], "<Store s3>")

    def test_worker_failure(self) -> None:
        """A worker's failure arrives with its type and traceback."""
        from loghandler.supervisor import WorkerProcess
        from loghandler.worker import preformatted

        pipe: list[str] = []
        worker_log = Logger(
            namespace="w",
            observer=preformatted(lambda e: pipe.append(eventAsJSON(e))),  # type: ignore[arg-type]
        )
        try:
            {}["x"]
        except KeyError:
            worker_log.failure("{key}: failed", key="k")
        republished: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(republished.append)
        self.addCleanup(globalLogPublisher.removeObserver, republished.append)
        WorkerProcess(None, 1).childDataReceived(1, pipe[0].encode() + b"\n")  # type: ignore[arg-type]
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        line = json.loads(event_as_json(republished[-1]))
        self.assertEqual(line["message"], "k: failed")
        self.assertEqual(line["failure"]["type"], "builtins.KeyError")
        self.assertEqual(line["failure"]["message"], "'x'")
        self.assertIn('{}["x"]', line["failure"]["traceback"])
        self.assertEqual((line["worker"], line["key"]), (1, "k"))


class ConfigReprTests(SynchronousTestCase):
    """``repr(config)`` (a traceback's locals, a debug line) never shows a secret."""

    def test_secrets_hidden(self) -> None:
        config = from_environ(
            {
                "STORAGE": "azure",
                "AZURE_CONNECTION_STRING": "AccountName=a;AccountKey=c2VjcmV0a2V5;"
                "BlobEndpoint=http://127.0.0.1:1/a",
                "AZURE_CONTAINER": "logs",
                "AWS_ACCESS_KEY": "AKIDEXAMPLE",
                "AWS_ACCESS_SECRET": "wJalrXUtnFEMI",
            }
        )
        text = repr(config)
        for secret in ("c2VjcmV0a2V5", "wJalrXUtnFEMI"):
            self.assertNotIn(secret, text)
        self.assertIn("azure_connection_string='<hidden>'", text)
        self.assertIn("aws_access_secret='<hidden>'", text)
        self.assertIn("azure_key=None", text)

    def test_every_secret_setting_hidden(self) -> None:
        """Each setting marked secret (the ones twistd takes from the environment only)."""
        import attrs

        from loghandler.config import SETTINGS, Config

        secret = [s for s in SETTINGS if s.secret]
        self.assertGreaterEqual(len(secret), 4)
        for setting in secret:
            config = attrs.evolve(Config(), **{setting.field: "s3cr3t-" + setting.env})
            self.assertNotIn("s3cr3t", repr(config), setting.env)
            self.assertIn("%s='<hidden>'" % setting.field, repr(config))


class LogCallAuditTests(SynchronousTestCase):
    """
    Every log call in ``loghandler/`` has a literal format string (no f-string, no
    ``%`` or ``.format``: the values go as named fields an operator can query in
    JSON), every ``{name}`` it refers to is given as a keyword, and it names its
    kind of event in a stable ``event=`` field.
    """

    LEVELS = {"debug", "info", "warn", "error", "critical", "failure"}

    def calls(self) -> list[tuple[str, Any]]:
        import ast
        import os

        import loghandler

        root = os.path.dirname(loghandler.__file__)
        found = []
        for directory, _, names in os.walk(root):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and node.func.attr in self.LEVELS
                        and isinstance(node.func.value, (ast.Name, ast.Attribute))
                        and (
                            getattr(node.func.value, "id", None) == "_log"
                            or getattr(node.func.value, "attr", None) == "_log"
                        )
                    ):
                        where = "%s:%d" % (os.path.relpath(path, root), node.lineno)
                        found.append((where, node))
        return found

    def test_log_calls(self) -> None:
        import ast
        import string

        problems = []
        calls = self.calls()
        self.assertGreater(len(calls), 50)
        for where, node in calls:
            if (
                not node.args
                or not isinstance(node.args[0], ast.Constant)
                or not isinstance(node.args[0].value, str)
            ):
                problems.append(f"{where}: the format is not a string literal")
                continue
            keywords = {k.arg for k in node.keywords}
            if "event" not in keywords:
                problems.append(f"{where}: no event= field (a stable name for this event)")
            if None in keywords:  # **fields: the names are checked at run time
                continue
            for _, name, _, _ in string.Formatter().parse(node.args[0].value):
                if name is not None and name.split(".")[0].split("[")[0] not in keywords:
                    problems.append(f"{where}: {{{name}}} is not given as a keyword")
        self.assertEqual(problems, [])
