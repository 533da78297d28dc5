"""Process launching shared by the offline Engine and the HTTP server, and the Engine itself.

The Engine runs the TokenizerManager's asyncio loop in a background thread, so `generate` is
a plain blocking call that works from any thread (also inside a running event loop, as in a
notebook), and `async_generate` can be awaited on the caller's own loop.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
import weakref
from typing import Any, AsyncIterator, Callable, Iterator

from sglab.srt.managers.io_struct import (
    FlushCacheReqOutput,
    GenerateReqInput,
    LoadLoRAAdapterReqInput,
    LoRAUpdateOutput,
    UnloadLoRAAdapterReqInput,
)
from sglab.srt.managers.tokenizer_manager import TokenizerManager
from sglab.srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)

_DONE = object()
# A child process that re-ran the user's script while bootstrapping (spawn re-imports
# __main__) and found an Engine being created there exits with this code.
_REIMPORTED_MAIN_EXIT_CODE = 87
_IPC_OWNER_FILE = "owner"


class ChildProcesses:
    """The scheduler and detokenizer processes of one server, and the thread watching them."""

    def __init__(self, processes: list[mp.process.BaseProcess], ipc_dir: str | None):
        self.processes = processes
        self.ipc_dir = ipc_dir
        self._stopping = threading.Event()
        self._killed = False

    def start_watchdog(self, on_death: Callable[[str], None]) -> None:
        """Call `on_death(message)` (from a thread) if a child exits before kill()."""
        threading.Thread(target=self._watch, args=(on_death,), name="sglab-child-watchdog",
                         daemon=True).start()

    def _watch(self, on_death: Callable[[str], None]) -> None:
        sentinels = {p.sentinel: p for p in self.processes}
        while not self._stopping.is_set():
            ready = mp.connection.wait(list(sentinels), timeout=1.0)
            if not ready or self._stopping.is_set():
                continue
            proc = sentinels[ready[0]]
            proc.join(1.0)
            message = (f"Child process {proc.name} (pid {proc.pid}) exited unexpectedly with "
                       f"exit code {proc.exitcode}; see its log above.")
            logger.error(message)
            on_death(message)
            return

    def kill(self) -> None:
        """Terminate every child and its descendants; idempotent."""
        if self._killed:
            return
        self._killed = True
        self._stopping.set()
        # Every child is signalled before any is joined: a TP rank that outlived its peers by
        # a join would report their closed connections as its own failure.
        for proc in self.processes:
            _kill_process_tree(proc, join=False)
        for proc in self.processes:
            proc.join(5.0)
        if self.ipc_dir is not None:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


def _kill_process_tree(proc: mp.process.BaseProcess, join: bool = True) -> None:
    """SIGKILL `proc` and its descendants (children ignore SIGTERM, see _run_child)."""
    if proc.pid is None:
        return
    try:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
    except Exception:  # noqa: BLE001 - the process may be gone already
        pass
    if proc.is_alive():
        proc.kill()
    if join:
        proc.join(5.0)


def _run_child(target: Callable[..., None], ipc_dir: str | None, *args: Any) -> None:
    """Process entry point: the parent alone decides when we stop, and we die with it.

    SIGINT and SIGTERM sent to the whole process group (Ctrl-C, `kill -- -PGID`) are ignored,
    so the parent can shut down in order instead of seeing its children crash. A parent that
    died without cleaning up (SIGKILL) leaves the IPC directory to us.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _set_process_name(mp.current_process().name)
    parent_pid = os.getppid()

    def watch_parent() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                if ipc_dir is not None:
                    shutil.rmtree(ipc_dir, ignore_errors=True)
                os._exit(1)

    threading.Thread(target=watch_parent, name="sglab-parent-watch", daemon=True).start()
    target(*args)


def _set_process_name(name: str) -> None:
    """Show `name` (cut to 15 bytes) in ps/top, as upstream's setproctitle does."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _ipc_dir(port_args: PortArgs) -> str | None:
    path = os.path.dirname(port_args.tokenizer_ipc_name.removeprefix("ipc://"))
    tmp = os.path.realpath(tempfile.gettempdir())
    if os.path.basename(path).startswith("sglab-ipc-") and \
            os.path.realpath(os.path.dirname(path)) == tmp:
        return path
    return None


def _claim_ipc_dir(ipc_dir: str) -> None:
    """Record this process as the directory's owner ("pid create_time", so a reused pid
    is told apart), for remove_stale_ipc_dirs."""
    import psutil

    with open(os.path.join(ipc_dir, _IPC_OWNER_FILE), "w") as f:
        f.write(f"{os.getpid()} {psutil.Process().create_time()}")


def remove_stale_ipc_dirs() -> list[str]:
    """Remove this user's sglab IPC directories whose owner process is gone; returns them."""
    import psutil

    removed = []
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if not name.startswith("sglab-ipc-") or not _owned_by_me(path):
            continue
        try:
            with open(os.path.join(path, _IPC_OWNER_FILE)) as f:
                pid, created = f.read().split()
            alive = abs(psutil.Process(int(pid)).create_time() - float(created)) < 1e-3
        except (OSError, ValueError):
            continue  # no owner file (yet, or an older sglab): not ours to judge
        except psutil.Error:
            alive = False
        if not alive:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _owned_by_me(path: str) -> bool:
    try:
        return os.stat(path).st_uid == os.getuid()
    except OSError:
        return False


def _launch_subprocesses(server_args: ServerArgs,
                         scheduler_target: Callable[..., None] | None = None,
                         ) -> tuple[TokenizerManager, dict]:
    """Start the schedulers (one per TP rank), the data-parallel controller (DP attention) and
    the detokenizer, build the TokenizerManager, wait until every rank is ready.

    The returned TokenizerManager carries the children as `tokenizer_manager.child_processes`.
    Raises RuntimeError with a scheduler's message if one fails or dies while starting (the
    other ranks, possibly waiting for it in a collective, are killed).
    """
    from sglab.srt.managers.detokenizer_manager import run_detokenizer_process
    from sglab.srt.managers.scheduler import run_scheduler_process

    for path in remove_stale_ipc_dirs():
        logger.info("Removed %s, left behind by a server that was killed", path)
    port_args = PortArgs.init_new(server_args)
    ipc_dir = _ipc_dir(port_args)
    if ipc_dir is not None:
        _claim_ipc_dir(ipc_dir)
    ctx = mp.get_context("spawn")
    schedulers, readers = _start_schedulers(ctx, scheduler_target or run_scheduler_process,
                                            server_args, port_args, ipc_dir)
    processes = list(schedulers)
    if server_args.enable_dp_attention:
        from sglab.srt.managers.data_parallel_controller import (
            run_data_parallel_controller_process,
        )

        controller = ctx.Process(target=_run_child, name="sglab::data_parallel_controller",
                                 args=(run_data_parallel_controller_process, ipc_dir,
                                       server_args, port_args))
        controller.start()
        processes.append(controller)
    if not server_args.skip_tokenizer_init:
        detokenizer = ctx.Process(target=_run_child, name="sglab::detokenizer",
                                  args=(run_detokenizer_process, ipc_dir, server_args,
                                        port_args))
        detokenizer.start()
        processes.append(detokenizer)
    children = ChildProcesses(processes, ipc_dir)
    # Registered after multiprocessing's own exit hook, so it runs first (atexit is LIFO).
    atexit.register(children.kill)
    tokenizer_manager = None
    try:
        tokenizer_manager = TokenizerManager(server_args, port_args)
        scheduler_info = _wait_for_schedulers(readers, schedulers, processes)
    except BaseException:
        children.kill()
        if tokenizer_manager is not None:
            tokenizer_manager.close()
        raise
    finally:
        for reader in readers:
            reader.close()
    tokenizer_manager.set_scheduler_info(scheduler_info)
    tokenizer_manager.child_processes = children
    return tokenizer_manager, scheduler_info


def _start_schedulers(ctx: Any, target: Callable[..., None], server_args: ServerArgs,
                      port_args: PortArgs, ipc_dir: str | None) -> tuple[list, list]:
    """One scheduler process per TP rank, each with the pipe it reports readiness on."""
    schedulers, readers = [], []
    for rank in range(server_args.tp_size):
        reader, writer = ctx.Pipe(duplex=False)
        name = "sglab::scheduler" if server_args.tp_size == 1 else f"sglab::scheduler_TP{rank}"
        proc = ctx.Process(target=_run_child, name=name,
                           args=(target, ipc_dir, server_args, port_args, writer, rank))
        proc.start()
        writer.close()
        schedulers.append(proc)
        readers.append(reader)
    return schedulers, readers


def _wait_for_schedulers(readers: list, schedulers: list[mp.process.BaseProcess],
                         processes: list[mp.process.BaseProcess]) -> dict:
    """Every rank's readiness message (rank 0's is returned); the first failure raises."""
    pending = dict(zip(readers, schedulers))
    messages = {}
    while pending:
        ready = mp.connection.wait(list(pending), timeout=0.5)
        for reader in ready:
            proc = pending.pop(reader)
            messages[proc.name] = _read_ready(reader, proc, schedulers.index(proc),
                                              len(schedulers))
        if not ready:
            _check_alive(processes, pending)
    return messages[schedulers[0].name]


def _check_alive(processes: list[mp.process.BaseProcess], pending: dict) -> None:
    waiting = {proc: reader for reader, proc in pending.items()}
    for proc in processes:
        if not proc.is_alive() and not (proc in waiting and waiting[proc].poll(0)):
            proc.join(1.0)
            if proc.exitcode == _REIMPORTED_MAIN_EXIT_CODE:
                raise RuntimeError(_main_guard_message())
            raise RuntimeError(f"{proc.name} died during initialization (exit code "
                               f"{proc.exitcode}); see its log above.")


def _read_ready(reader: Any, scheduler: mp.process.BaseProcess, rank: int,
                tp_size: int) -> dict:
    who = "The scheduler" if tp_size == 1 else f"The scheduler of TP rank {rank}"
    try:
        message = reader.recv()
    except EOFError:
        scheduler.join(5.0)
        if scheduler.exitcode == _REIMPORTED_MAIN_EXIT_CODE:
            raise RuntimeError(_main_guard_message()) from None
        raise RuntimeError(f"{who} process died during initialization (exit code "
                           f"{scheduler.exitcode}); see its log above.") from None
    if message.get("status") != "ready":
        raise RuntimeError(f"{who} failed to start: {message.get('message')}")
    return message


def _exit_if_reimported_main() -> None:
    """In a child re-running the user's script (multiprocessing's spawn imports __main__
    again, as __mp_main__), an Engine at the script's top level must not start: the child
    exits with a code the parent turns into one clear error (_main_guard_message)."""
    if getattr(mp.current_process(), "_inheriting", False):  # set while bootstrapping
        raise SystemExit(_REIMPORTED_MAIN_EXIT_CODE)


def _main_guard_message() -> str:
    import __main__

    script = getattr(__main__, "__file__", None) or "your script"
    return (f"sglab.Engine was created at the top level of {script}, which every sglab child "
            "process imports again when it starts (multiprocessing's spawn start method). "
            "Create the Engine under a main guard:\n\n"
            "    if __name__ == \"__main__\":\n"
            "        engine = sglab.Engine(...)\n")


def _shutdown(tokenizer_manager: TokenizerManager, loop: asyncio.AbstractEventLoop,
              thread: threading.Thread) -> None:
    tokenizer_manager.child_processes.kill()
    tokenizer_manager.notify_dead("The engine was shut down.")
    if loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all_tasks(), loop).result(timeout=5.0)
        except Exception:  # noqa: BLE001 - best effort; the loop stops below anyway
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
    tokenizer_manager.close()


async def _cancel_all_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _first(agen: AsyncIterator) -> Any:
    try:
        return await agen.__anext__()
    finally:
        await agen.aclose()


async def _aclose(agen: AsyncIterator) -> None:
    await agen.aclose()


async def _anext(agen: AsyncIterator) -> Any:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return _DONE


class Engine:
    """The offline, in-process entry point: `Engine(model_path=...).generate(prompt, params)`.

    Takes ServerArgs fields as keyword arguments, or `server_args=ServerArgs(...)`.
    """

    def __init__(self, **kwargs: Any):
        _exit_if_reimported_main()
        server_args = kwargs.pop("server_args", None)
        if server_args is None:
            server_args = ServerArgs(**kwargs)
        elif kwargs:
            raise TypeError("Pass either server_args or ServerArgs fields, not both.")
        self.server_args = server_args
        self._closed = True
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglab-engine-loop",
                                        daemon=True)
        self._thread.start()
        try:
            self.tokenizer_manager, self.scheduler_info = _launch_subprocesses(server_args)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self.tokenizer_manager.server_status = "Up"
        self.tokenizer_manager.child_processes.start_watchdog(self.tokenizer_manager.notify_dead)
        self._finalizer = weakref.finalize(self, _shutdown, self.tokenizer_manager, self._loop,
                                           self._thread)
        atexit.register(self._finalizer)
        self._closed = False

    # --- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        stream: bool = False,
        lora_path: str | list[str | None] | None = None,
        rid: str | list[str] | None = None,
        return_text_in_logprobs: bool = False,
        token_ids_logprob: list[int] | list[list[int]] | None = None,
        custom_logit_processor: str | list[str | None] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """One request (a dict back) or a batch (a list back); stream=True gives an iterator.
        The arguments are GenerateReqInput's fields (`prompt` is its `text`), as upstream's."""
        agen = self._generate_request(locals())
        if stream:
            return self._iterate(agen)
        return self._run(_first(agen))

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        stream: bool = False,
        lora_path: str | list[str | None] | None = None,
        rid: str | list[str] | None = None,
        return_text_in_logprobs: bool = False,
        token_ids_logprob: list[int] | list[list[int]] | None = None,
        custom_logit_processor: str | list[str | None] | None = None,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """generate() on the caller's event loop: a dict, a list, or (stream=True) an async
        iterator."""
        agen = self._generate_request(locals())
        if stream:
            return self._aiterate(agen)
        return await self._await(_first(agen))

    def _generate_request(self, args: dict[str, Any]) -> AsyncIterator:
        """The one place generate / async_generate build their request, from their arguments
        (GenerateReqInput's fields; `prompt` is its `text`): the TokenizerManager's output
        stream for it, which runs once iterated."""
        fields = {k: v for k, v in args.items() if k != "self"}
        obj = GenerateReqInput(text=fields.pop("prompt"), **fields)
        return self.tokenizer_manager.generate_request(obj, None)

    def _iterate(self, agen: AsyncIterator) -> Iterator[dict]:
        try:
            while (out := self._run(_anext(agen))) is not _DONE:
                yield out
        finally:
            self._close_agen(agen)

    async def _aiterate(self, agen: AsyncIterator) -> AsyncIterator[dict]:
        try:
            while (out := await self._await(_anext(agen))) is not _DONE:
                yield out
        finally:
            if not self._closed:
                await self._await(_aclose(agen))

    def _close_agen(self, agen: AsyncIterator) -> None:
        """Close a stream left early (this aborts its requests); never blocks the loop."""
        if self._closed:
            return
        future = self._submit(_aclose(agen))
        if threading.current_thread() is not self._thread:
            try:
                future.result(timeout=5.0)
            except Exception:  # noqa: BLE001 - the stream is being dropped anyway
                pass

    def _run(self, coro: Any) -> Any:
        """Run `coro` on the engine loop and block for its result."""
        future = self._submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def _await(self, coro: Any) -> Any:
        return await asyncio.wrap_future(self._submit(coro))

    def _submit(self, coro: Any) -> Any:
        if self._closed:
            coro.close()
            raise RuntimeError("The engine is shut down.")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def score(self, query: Any = None, items: Any = None,
              label_token_ids: list[int] | None = None, apply_softmax: bool = False,
              item_first: bool = False) -> list[list[float]]:
        """Upstream's Engine.score: per item, the label tokens' probabilities after
        query + item (as /v1/score)."""
        from sglab.srt.entrypoints.openai.serving_score import score_request

        scores, _ = self._run(score_request(self.tokenizer_manager, query, items,
                                            label_token_ids, apply_softmax, item_first))
        return scores

    # --- control -----------------------------------------------------------------------------

    def flush_cache(self) -> FlushCacheReqOutput:
        return self._run(self.tokenizer_manager.flush_cache())

    def get_server_info(self) -> dict:
        return self._run(self.tokenizer_manager.get_server_info())

    def start_profile(self, **kwargs: Any) -> Any:
        return self._run(self.tokenizer_manager.start_profile(**kwargs))

    def stop_profile(self) -> Any:
        return self._run(self.tokenizer_manager.stop_profile())

    def load_lora_adapter(self, lora_name: str, lora_path: str,
                          pinned: bool = False) -> LoRAUpdateOutput:
        obj = LoadLoRAAdapterReqInput(lora_name=lora_name, lora_path=lora_path, pinned=pinned)
        return self._run(self.tokenizer_manager.load_lora_adapter(obj))

    def unload_lora_adapter(self, lora_name: str) -> LoRAUpdateOutput:
        obj = UnloadLoRAAdapterReqInput(lora_name=lora_name)
        return self._run(self.tokenizer_manager.unload_lora_adapter(obj))

    def shutdown(self) -> None:
        """Stop the children and the loop; idempotent, also run at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

