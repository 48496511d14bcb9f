"""What ``eval.suites`` and ``--tasks`` name, resolved to tasks: tuneguard's own or lm-evaluation-harness's.

``tasks.py`` owns the built-in tasks, suites and task YAML files; an ``lm_eval:`` name goes to the
bridge, which needs lm-eval (an optional extra) and reads the built-in tasks itself (``@vendored``),
so the one place that knows both sits above them.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import replace

from tuneguard.errors import TuneguardError, require_lm_eval
from tuneguard.eval.records import Task
from tuneguard.eval.tasks import SUITES, TASKS, load_task_yaml
from tuneguard.recipe import LmEvalConfig


def get_tasks(names: Sequence[str], lm_eval: LmEvalConfig | None = None) -> list[Task]:
    """Tasks by name, suite name, path to a task YAML or ``lm_eval:`` task, in the given order without duplicates.

    ``lm_eval`` says how lm-evaluation-harness tasks are run (shots, chat template); the defaults if None.
    """
    out: dict[str, Task] = {}
    for name in names:
        if name.startswith("lm_eval:"):
            require_lm_eval(f"'{name}'")
            from tuneguard.eval.lm_eval_bridge import lm_eval_tasks

            for task in lm_eval_tasks(name, lm_eval or LmEvalConfig()):
                out.setdefault(task.name, task)
        elif name in SUITES:
            for task_name, limit in SUITES[name].items():
                out.setdefault(task_name, replace(TASKS[task_name], limit=limit))
        elif name in TASKS:
            out[name] = TASKS[name]
        elif name.endswith((".yaml", ".yml")):
            task = load_task_yaml(name)
            out[task.name] = task
        else:
            close = difflib.get_close_matches(name, [*SUITES, *TASKS], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TuneguardError(
                f"unknown task or suite '{name}'{hint} (suites: {', '.join(SUITES)}; tasks: {', '.join(TASKS)}; "
                "a path to a task .yaml, or lm_eval:NAME for lm-evaluation-harness's tasks)"
            )
    return list(out.values())
