"""The patch registry: every carried upstream change, its flag and its document.

Each patch has one `ServerArgs` field (`enable_<flag>`, on by default), the CLI pair
`--enable-<flag>` / `--disable-<flag>`, and can be set in bulk with `--patches none|all|<ids>`.
Explicit per-patch flags win over `--patches`.

Code reads the flags only through `PatchFlags`, built once from `ServerArgs` by
`PatchFlags.from_server_args` (the ModelRunner's, handed to each consumer's constructor), never
from `ServerArgs` directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from sglab.srt.server_args import ServerArgs


@dataclass(frozen=True)
class Patch:
    id: str
    slug: str
    flag: str  # ServerArgs field is f"enable_{flag}"; CLI is --enable-/--disable-<flag with dashes>
    upstream: str
    title: str
    # Sub-modes of "on" (ServerArgs field and its choices, the first is the default): the PR
    # itself and, where sglab goes further, its own modes beyond the PR (see the patch doc).
    mode_field: str | None = None
    modes: tuple[str, ...] = ()
    mode_help: str = ""
    # What reaches the patch's code: `requires` says whether a configuration can (None: every
    # one can); `scope` is the reason reported when it cannot, and always when no server
    # argument decides it (only some requests reach the code).
    requires: Callable[[ServerArgs], bool] | None = None
    scope: str | None = None

    @property
    def field(self) -> str:
        return f"enable_{self.flag}"

    @property
    def cli(self) -> str:
        return self.flag.replace("_", "-")

    @property
    def doc(self) -> str:
        return f"patches/{self.id}-{self.slug}.md"

    @property
    def mode_cli(self) -> str | None:
        return f"--{self.mode_field.replace('_', '-')}" if self.mode_field else None


def _runs_unified_extend(server_args: ServerArgs) -> bool:
    return server_args.enable_deterministic_inference and \
        server_args.attention_backend == "triton"


def _with_hisparse(server_args: ServerArgs) -> bool:
    return bool(server_args.enable_hisparse)


def _with_lora(server_args: ServerArgs) -> bool:
    return bool(server_args.enable_lora)


_LORA_SCOPE = "only with LoRA (--enable-lora or --lora-paths)"


def _with_dp_attention(server_args: ServerArgs) -> bool:
    return bool(server_args.enable_dp_attention)


def _serves_hybrid(server_args: ServerArgs) -> bool:
    from sglab.srt.configs.mamba_utils import is_hybrid_model_path

    return is_hybrid_model_path(server_args.model_path)

PATCHES: list[Patch] = [
    Patch("0001", "pinned-h2d-forward-batch", "pinned_h2d", "sglang#21360",
          "pinned + non_blocking H2D in ForwardBatch.init_new",
          mode_field="pinned_h2d_mode", modes=("pr", "packed"),
          mode_help="With patch 0001 on: pr = each upload built in pinned memory (upstream's "
                    "final form); packed = sglab's own mode beyond the PR, one pinned staging "
                    "buffer and one H2D copy per step."),
    Patch("0002", "sync-free-unified-extend", "sync_free_unified_extend", "sglang#11536",
          "_forward_extend_unified index build without per-request GPU->CPU syncs",
          mode_field="unified_index_build", modes=("batched", "kernel"),
          mode_help="With patch 0002 on: batched = the PR's single D2H per call; kernel = "
                    "upstream main's zero-sync build, once per forward.",
          requires=_runs_unified_extend,
          scope="only deterministic inference with the triton backend runs "
                "_forward_extend_unified"),
    Patch("0003a", "sync-free-logits-metadata", "sync_free_logits_metadata",
          "sglang#19190 / #24627",
          "logits processor: pinned index tensors, repeat_interleave(output_size=)",
          scope="only requests with prompt logprobs reach its code"),
    Patch("0003b", "sync-free-mamba-pool", "sync_free_mamba_pool", "sglang#19190 / #19639",
          "Mamba state pool: sync-free zeroing, track indices on the device, no .tolist()",
          mode_field="mamba_track_setup", modes=("pr", "host"),
          mode_help="With patch 0003b on: pr = the PR's four sites (upstream 0.5.11); host = "
                    "sglab's own mode beyond the PR, which also builds the prefill track plan "
                    "and the row mappings from host mirrors (no per-request .item(), "
                    "mask.any(), .cpu() or list-indexed writes).",
          requires=_serves_hybrid,
          scope="only hybrid Gated DeltaNet models (Qwen3.5); the decode track sites only with "
                "--mamba-scheduler-strategy extra_buffer"),
    Patch("0003c", "dp-all-extend-in-batch", "dp_prefill_cuda_graph", "sglang#19190",
          "all_extend_in_batch through the batch types: prefill CUDA graphs under DP attention",
          requires=_with_dp_attention,
          scope="only with --enable-dp-attention (every DP rank votes on each step)"),
    Patch("0004", "hisparse-async-backup", "hisparse_async_backup", "sglang#21932",
          "HiSparse decode backup on its own stream, chained by events",
          mode_field="hisparse_backup_mode", modes=("pr", "async_finish"),
          mode_help="With patch 0004 on: pr = the PR (a finishing request still reads its "
                    "buffer back from the device, so that step blocks); async_finish = sglab's "
                    "own mode beyond the PR, a finishing request frees from host mirrors "
                    "behind an event: no step blocks.",
          requires=_with_hisparse,
          scope="only with --enable-hisparse (the decode backup of the host KV tier)"),
    Patch("0005", "lora-cache-qkv-offset", "lora_cache_qkv_offset", "sglang#6960",
          "LoRA set_lora_info: qkv output_offset built once, no per-forward H2D",
          requires=_with_lora, scope=_LORA_SCOPE),
    Patch("0005b", "lora-async-batch-info", "lora_async_batch_info", "sglang#6994",
          "LoRA batch info built on the host, pinned, copied non_blocking",
          requires=_with_lora, scope=_LORA_SCOPE),
]

PATCH_BY_ID: dict[str, Patch] = {p.id: p for p in PATCHES}


def parse_patch_list(value: str) -> set[str]:
    """`none`, `all`, or comma-separated ids; raises ValueError naming the unknown id."""
    value = value.strip().lower()
    if value == "all":
        return set(PATCH_BY_ID)
    if value in ("none", ""):
        return set()
    ids = {v.strip() for v in value.split(",") if v.strip()}
    unknown = sorted(ids - set(PATCH_BY_ID))
    if unknown:
        raise ValueError(f"--patches: unknown patch id(s) {', '.join(unknown)} "
                         f"(known: {', '.join(PATCH_BY_ID)}, or all/none)")
    return ids


@dataclass(frozen=True)
class PatchFlags:
    """Which patches are on, and their sub-modes (meaningful only while their patch is on).

    One field per registry flag and mode field; `from_server_args` is the only reader of the
    `ServerArgs` patch fields.
    """

    pinned_h2d: bool  # 0001
    sync_free_unified_extend: bool  # 0002
    sync_free_logits_metadata: bool  # 0003a
    sync_free_mamba_pool: bool  # 0003b
    dp_prefill_cuda_graph: bool  # 0003c
    hisparse_async_backup: bool  # 0004
    lora_cache_qkv_offset: bool  # 0005
    lora_async_batch_info: bool  # 0005b
    pinned_h2d_mode: str  # 0001: pr | packed
    unified_index_build: str  # 0002: batched | kernel
    mamba_track_setup: str  # 0003b: pr | host
    hisparse_backup_mode: str  # 0004: pr | async_finish

    def __post_init__(self) -> None:
        for patch in PATCHES:
            if patch.mode_field:
                assert getattr(self, patch.mode_field) in patch.modes, patch.mode_field

    @classmethod
    def from_server_args(cls, server_args: ServerArgs) -> PatchFlags:
        values = {}
        for patch in PATCHES:
            values[patch.flag] = bool(getattr(server_args, patch.field))
            if patch.mode_field:
                values[patch.mode_field] = getattr(server_args, patch.mode_field)
        return cls(**values)

    def is_on(self, patch: Patch) -> bool:
        return getattr(self, patch.flag)

    def mode(self, patch: Patch) -> str | None:
        """The patch's sub-mode while it is on; None when it is off or has no modes."""
        return getattr(self, patch.mode_field) if patch.mode_field and self.is_on(patch) else None

    def active_ids(self) -> list[str]:
        return [p.id for p in PATCHES if self.is_on(p)]


def patch_status(flags: PatchFlags, server_args: ServerArgs) -> dict[str, dict]:
    """Per patch id: on/off, whether this configuration reaches its code, its sub-mode, and
    the scope of its code where that is narrower than every request (/get_server_info)."""
    status = {}
    for patch in PATCHES:
        applies = patch.requires is None or bool(patch.requires(server_args))
        reason = patch.scope if patch.requires is None or not applies else None
        status[patch.id] = {"on": flags.is_on(patch), "applies": applies,
                            "mode": flags.mode(patch), "reason": reason}
    return status


def active_patch_ids(server_args: ServerArgs) -> list[str]:
    return PatchFlags.from_server_args(server_args).active_ids()
