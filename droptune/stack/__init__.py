"""``droptune stack``: the service topology of ``docker-compose.yml`` on one host, without Docker.

``stack up SPEC`` starts an MLflow tracking server on a SQL backend store (PostgreSQL in the
service setup), creates the study in the Optuna storage, and starts N ``droptune worker``
processes that share it. A *supervisor* holds them: the ``up`` process itself in the foreground
(Ctrl-C stops everything), or a background process with ``--detach``. When every worker has
exited and the study has its trials, the supervisor closes the study's MLflow parent run and keeps
the server up until ``stack down`` (or Ctrl-C, or at once with ``--exit-when-done``). With
``--tracking-uri`` it starts no server and joins one that runs (workers on another GPU host);
the parent run is then left to the stack that owns the server.

Secrets never reach a command line, where ``ps`` shows them: the storage URL goes to the workers
in ``DROPTUNE_STORAGE``, the backend store URI to ``mlflow server`` in
``MLFLOW_BACKEND_STORE_URI``, and the state file holds masked URLs only.

Every process runs in its own process group; the state file (``<state-dir>/stack.json``) records
each one with its start time, so ``stack down`` stops exactly the processes the stack started
(SIGTERM, then SIGKILL) and never a process that later reused a PID.
"""

from droptune.processes import ProcRef
from droptune.processes import proc_start
from droptune.stack._cli import stack_app
from droptune.stack._control import Stack
from droptune.stack._control import run_stack
from droptune.stack._control import start_stack
from droptune.stack._control import stop_stack
from droptune.stack._state import BACKEND_ENV
from droptune.stack._state import DEFAULT_STATE_DIR
from droptune.stack._state import STATE_FILE
from droptune.stack._state import read_state


__all__ = [
    "BACKEND_ENV",
    "DEFAULT_STATE_DIR",
    "STATE_FILE",
    "ProcRef",
    "Stack",
    "proc_start",
    "read_state",
    "run_stack",
    "stack_app",
    "start_stack",
    "stop_stack",
]
