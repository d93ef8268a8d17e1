"""``info``, ``specs``, ``changes``, ``hook``: a preset's figures, and what the plugin registers and changes."""

from __future__ import annotations

import argparse
import json
import sys

from megatron_dsv3.launch import hook
from megatron_dsv3.model.accounting import count
from megatron_dsv3.model.presets import PRESETS, get_preset
from megatron_dsv3.model.spec_names import registered_specs


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="parameter, KV-cache and FLOP counts of a model preset")
    p.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)


def cmd_info(ns: argparse.Namespace) -> int:
    preset = get_preset(ns.preset)
    counts = count(preset)
    if ns.json:
        print(json.dumps({"preset": preset.name, **counts.to_dict()}, indent=2))
        return 0
    rows = [
        ("preset", f"{preset.name}: {preset.description}"),
        ("total parameters", f"{_human(counts.total_params)} ({counts.total_params:,})"),
        ("activated per token", f"{_human(counts.active_params)} ({counts.active_params:,})"),
        ("MTP parameters", f"{_human(counts.mtp_params)} ({counts.mtp_params:,}), depth {preset.mtp_num_layers}"),
        ("KV cache per token", f"{counts.kv_cache_bytes_per_token:,} bytes (BF16, MLA latent + rope key)"),
        ("training FLOPs per token", f"{_human(counts.flops_per_token, 'FLOP')} at seq {preset.seq_length}"
         f" (+{_human(counts.mtp_flops_per_token, 'FLOP')} for MTP)"),
        ("layers", f"{preset.num_layers} ({preset.first_k_dense} dense, {preset.num_moe_layers} MoE)"),
        ("experts", f"{preset.num_routed_experts} routed + {preset.num_shared_experts} shared,"
         f" top-{preset.moe_router_topk}, {preset.score_function} scores"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def add_changes_parser(sub) -> None:
    p = sub.add_parser("changes", help="list every run-time change the plugin makes to Megatron")
    p.add_argument("--markdown", action="store_true", help="print docs/megatron-changes.md")
    p.set_defaults(func=cmd_changes)


def cmd_changes(ns: argparse.Namespace) -> int:
    # lazy: the catalog imports torch and every change's module; other commands must not pay for it.
    from megatron_dsv3.runtime.catalog import all_changes, render_markdown

    if ns.markdown:
        sys.stdout.write(render_markdown())
        return 0
    for change in all_changes():
        first = change.reason.split("\n")[0]
        print(f"[{change.group}] {change.name}: {first}")
        print(f"    replaces {', '.join(change.targets)}")
    return 0


def add_specs_parser(sub) -> None:
    p = sub.add_parser("specs", help="list the spec names `--spec NAME` accepts")
    p.set_defaults(func=cmd_specs)


def cmd_specs(ns: argparse.Namespace) -> int:
    for name, target in sorted(registered_specs().items()):
        print(f"{name}  ->  {target}")
    return 0


def add_hook_parser(sub) -> None:
    p = sub.add_parser("hook", help="the start-up hook that wires --spec dsv3 into Megatron-LM")
    p.add_argument("action", choices=["status", "install", "uninstall"], nargs="?", default="status")
    p.set_defaults(func=cmd_hook)


def cmd_hook(ns: argparse.Namespace) -> int:
    if ns.action == "install":
        print(f"installed {hook.install()}")
    elif ns.action == "uninstall":
        print("removed" if hook.uninstall() else "not installed", hook.pth_path())
    else:
        for key, value in hook.status().items():
            print(f"{key}: {value}")
    return 0
