"""Running tools under limits (jaxrl_llm.envs.sandbox): outcomes, the worker's recovery,
the network guard, the in-process mode.

The worker process imports this module to load its tools, so the module's top level
imports only the standard library and pytest: jaxrl_llm (and with it JAX) is imported by
the ``sb`` fixture, which keeps each worker (re)start at a fraction of a second.
"""

from __future__ import annotations

import functools
import os
import socket
import time

import pytest

# ---------------------------------------------------------------------------- tools (module level: picklable)


def add(a: int, b: int) -> int:
    return a + b


def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


def fail(message: str) -> str:
    raise ValueError(message)


def exit_tool() -> str:
    raise SystemExit(3)


def die(code: int) -> str:
    os._exit(code)


def big(n: int) -> str:
    return "x" * n


def chatty(n: int) -> None:
    for i in range(n):
        print(f"line {i}")


def structured(n: int) -> dict:
    return {"n": n, "squares": [i * i for i in range(n)]}


def connect() -> str:
    socket.create_connection(("127.0.0.1", 9), timeout=1.0)
    return "connected"


def raw_socket() -> str:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    return "socket made"


def pid() -> int:
    return os.getpid()


def catches_everything(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except Exception:
        return "swallowed"
    return "slept"


@pytest.fixture(scope="module")
def sb():
    from jaxrl_llm.envs import sandbox

    return sandbox


@pytest.fixture(scope="module")
def worker(sb):
    box = sb.Sandbox("process")
    yield box
    box.close()


# ---------------------------------------------------------------------------- outcomes


def test_ok_outputs(sb, worker):
    assert worker.run(add, {"a": 2, "b": 3}) == sb.ToolOutcome("ok", "5", elapsed_s=pytest.approx(0, abs=5),
                                                                  limit_s=5.0)
    assert worker.run(structured, {"n": 3}).output == '{"n": 3, "squares": [0, 1, 4]}'
    assert worker.run(chatty, {"n": 2}).output == "line 0\nline 1\n"  # None → what it printed
    assert worker.run(functools.partial(add, b=10), {"a": 1}).output == "11"


def test_exception_and_system_exit_are_outcomes(sb, worker):
    out = worker.run(fail, {"message": "bad input"})
    assert (out.status, out.error_type, out.error_message) == ("error", "ValueError", "bad input")
    assert sb.outcome_text("fail", out) == "Error: tool 'fail' raised ValueError: bad input"
    out = worker.run(exit_tool, {})
    assert sb.outcome_text("exit_tool", out) == "Error: tool 'exit_tool' raised SystemExit: 3"
    assert sb.outcome_text("f", sb.ToolOutcome("error", error_type="KeyError")) == "Error: tool 'f' raised KeyError"


def test_output_is_truncated_to_the_cap(sb, worker):
    out = worker.run(big, {"n": 1000}, max_output_chars=100)
    assert out.output == "x" * 100 + "…[truncated 900 chars]" and out.truncated_chars == 900
    out = worker.run(chatty, {"n": 1000}, max_output_chars=20)  # printing is capped while captured
    printed = sum(len(f"line {i}\n") for i in range(1000))
    assert out.output == f"line 0\nline 1\nline 2…[truncated {printed - 20} chars]"
    assert worker.run(big, {"n": 100}, max_output_chars=100).output == "x" * 100
    assert sb.truncate("abcdef", 4) == ("abcd…[truncated 2 chars]", 2)


def test_timeout_kills_the_worker_and_the_next_call_recovers(sb, worker):
    first_pid = worker.run(pid, {}).output
    start = time.monotonic()
    out = worker.run(sleepy, {"seconds": 30.0}, timeout_s=0.5)
    assert out.status == "timeout" and time.monotonic() - start < 10
    assert sb.outcome_text("sleepy", out) == "Error: tool 'sleepy' timed out after 0.5 s"
    assert worker.run(add, {"a": 1, "b": 1}).output == "2"
    assert worker.run(pid, {}).output != first_pid  # a fresh worker
    assert worker.run(sleepy, {"seconds": 0.01}, timeout_s=5.0).output == "woke up"


def test_a_dying_worker_is_a_crash_outcome_and_recovers(sb, worker):
    out = worker.run(die, {"code": 7})
    assert out.status == "crash"
    assert sb.outcome_text("die", out) == "Error: tool 'die' crashed: the worker process exited with code 7"
    assert worker.run(add, {"a": 1, "b": 2}).output == "3"


def test_network_is_refused_in_the_worker(sb, worker):
    for fn in (connect, raw_socket):
        text = sb.outcome_text(fn.__name__, worker.run(fn, {}))
        assert text == f"Error: tool '{fn.__name__}' raised PermissionError: network access is disabled in the tool " \
                       "sandbox"


def test_unpicklable_tools_fail_early(sb, worker):
    def local(x: int) -> int:
        return x

    with pytest.raises(sb.ToolPickleError, match="tool 'local' cannot be sent to the sandbox worker.*module-level"):
        worker.check(local)
    with pytest.raises(sb.ToolPickleError, match="lambda"):
        worker.run(lambda: 1, {}, name="anon")
    sb.Sandbox("none").check(local)  # in-process: anything callable


def test_a_decorated_tool_runs_in_the_worker(worker):
    from tests.envs.test_tools import decorated, point

    assert worker.run(decorated, {"n": 21}).output == "42"
    from jaxrl_llm.envs.tools import make_tool

    assert worker.run(make_tool(point), {"xy": [1, 2], "scale": 3}).output == "[1, 2] 3 None"  # Optional filled


def test_argument_checks(worker):
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        worker.run(add, {"a": 1, "b": 2}, timeout_s=0)
    with pytest.raises(ValueError, match="max_output_chars must be an int >= 1"):
        worker.run(add, {"a": 1, "b": 2}, max_output_chars=0)
    with pytest.raises(ValueError, match="isolation must be one of"):
        type(worker)("docker")


def test_many_calls_are_fast(worker):
    worker.run(add, {"a": 0, "b": 0})
    start = time.monotonic()
    for i in range(200):
        assert worker.run(add, {"a": i, "b": 1}).output == str(i + 1)
    assert (time.monotonic() - start) / 200 < 0.02  # a pipe round trip, not a process start


# ---------------------------------------------------------------------------- in-process mode


def test_in_process_mode(sb):
    box = sb.Sandbox("none")
    assert box.run(add, {"a": 2, "b": 2}).output == "4"
    assert box.run(chatty, {"n": 1}).output == "line 0\n"
    out = box.run(fail, {"message": "m"})
    assert (out.status, out.error_type) == ("error", "ValueError")
    assert box.run(exit_tool, {}).error_type == "SystemExit"
    assert box.run(big, {"n": 30}, max_output_chars=10).output == "x" * 10 + "…[truncated 20 chars]"
    start = time.monotonic()
    out = box.run(catches_everything, {"seconds": 30.0}, timeout_s=0.3)  # `except Exception` cannot stop it
    assert out.status == "timeout" and out.limit_s == 0.3 and time.monotonic() - start < 5
    assert box.run(sleepy, {"seconds": 0.01}).output == "woke up"  # the alarm is off again


def test_shared_sandbox_is_one_per_isolation(sb):
    assert sb.shared_sandbox("none") is sb.shared_sandbox("none")
    assert sb.shared_sandbox("none") is not sb.shared_sandbox("process")


def env_var(key: str) -> str:
    return os.environ.get(key, "<unset>")


def test_worker_environment_hides_accelerators(sb):
    with sb.Sandbox("process", worker_env={"JAXRL_TOOL_TEST": "on"}) as box:
        assert box.run(env_var, {"key": "JAX_PLATFORMS"}).output == "cpu"
        assert box.run(env_var, {"key": "CUDA_VISIBLE_DEVICES"}).output == ""
        assert box.run(env_var, {"key": "JAXRL_TOOL_TEST"}).output == "on"


def test_a_module_the_worker_cannot_import_is_a_load_error(sb, worker):
    import sys
    import types

    ghost = types.ModuleType("jaxrl_ghost_tools")  # importable here (sys.modules), not in the worker
    exec("def ghost(x: int) -> int:\n    return x\n", ghost.__dict__)
    sys.modules["jaxrl_ghost_tools"] = ghost
    try:
        with pytest.raises(sb.ToolLoadError, match="tool 'ghost': the worker could not load it: "
                                                    "ModuleNotFoundError"):
            worker.run(ghost.ghost, {"x": 1})
    finally:
        del sys.modules["jaxrl_ghost_tools"]
    assert worker.run(add, {"a": 1, "b": 2}).output == "3"  # the worker is still fine


def test_in_process_time_limit_off_the_main_thread_is_not_enforced(sb):
    import threading

    box, result = sb.Sandbox("none"), {}
    thread = threading.Thread(target=lambda: result.update(out=box.run(sleepy, {"seconds": 0.05}, timeout_s=0.01)))
    thread.start()
    thread.join()
    assert result["out"].status == "ok" and result["out"].limit_s is None


def test_tools_of_a_file_loaded_by_path_run_in_the_worker(sb, worker, tmp_path):
    """``--env my_env.py:make_env`` loads the file under a private module name; the
    worker loads the same file under that name before unpickling its tools."""
    from jaxrl_llm.rewards.registry import load_callable

    path = tmp_path / "my_file_tools.py"
    path.write_text("import os\n\ndef times(a: int, b: int) -> int:\n    return a * b\n\n"
                    "def where() -> str:\n    return str(os.getpid())\n")
    times = load_callable(f"{path}:times", "env")
    assert times.__module__.startswith("_jaxrl_llm_env_")
    assert worker.run(times, {"a": 6, "b": 7}).output == "42"
    assert worker.run(load_callable(f"{path}:where", "env"), {}).output != str(os.getpid())  # in the worker
