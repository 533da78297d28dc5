"""The patch registry: every carried upstream change, its flag and its document.

Each patch has one `ServerArgs` field (`enable_<flag>`, on by default), the CLI pair
`--enable-<flag>` / `--disable-<flag>`, and can be set in bulk with `--patches none|all|<ids>`.
Explicit per-patch flags win over `--patches`.
"""

from __future__ import annotations

from dataclasses import dataclass


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
                    "upstream main's zero-sync build, once per forward."),
    Patch("0003a", "sync-free-logits-metadata", "sync_free_logits_metadata",
          "sglang#19190 / #24627",
          "logits processor: pinned index tensors, repeat_interleave(output_size=)"),
    Patch("0005", "lora-cache-qkv-offset", "lora_cache_qkv_offset", "sglang#6960",
          "LoRA set_lora_info: qkv output_offset built once, no per-forward H2D"),
    Patch("0005b", "lora-async-batch-info", "lora_async_batch_info", "sglang#6994",
          "LoRA batch info built on the host, pinned, copied non_blocking"),
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


def active_patch_ids(server_args) -> list[str]:
    return [p.id for p in PATCHES if getattr(server_args, p.field, False)]
