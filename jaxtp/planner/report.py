"""The plan as text: the fixed-width report `run.py --plan` prints."""

from __future__ import annotations

from ..hardware import GiB

__all__ = ["format_plan", "format_bytes", "format_seconds"]


def format_bytes(x: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size:
            return f"{x / size:,.2f} {unit}"
    return f"{int(x)} B"


def format_seconds(s: float) -> str:
    return f"{s * 1e3:,.2f} ms" if s >= 1e-3 else f"{s * 1e6:,.1f} us"


def _table(head, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    return [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]


def format_plan(p) -> str:
    """A readable, fixed-width report of a Plan."""
    return "\n".join(
        _header(p)
        + _memory(p)
        + _flops(p)
        + _collectives(p)
        + _time(p)
        + (["", "warnings"] + [f"  - {w}" for w in p.warnings] if p.warnings else [])
    )


def _header(p) -> list[str]:
    s, m, local = p.setting, p.model, p.setting["local"]
    mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items())
    step = (
        f"decode step: batch {s['batch_size']} x cache {s['seq_len']}, KV cache {s['kv_cache_dtype']}"
        if s["decode"]
        else f"train step: batch {s['batch_size']} x seq {s['seq_len']}, attention {s['attention']}"
    )
    return [
        f"plan: {m['param_count'] / 1e9:.3g}B params (D={m['d_model']}, L={m['n_layers']}, N={m['n_heads']}, "
        f"K={m['n_kv_heads']}, F={m['d_ff']}, V={m['padded_vocab']}) on mesh {mesh} of {p.hardware.name}",
        f"      {step}, params {s['param_dtype']}, compute {s['compute_dtype']}, optimizer {s['optimizer']}, "
        f"remat {s['remat']}",
        f"      per device: batch {local['B_l']}, heads {local['N_l']}, kv heads {local['K_l']}, "
        f"d_ff {local['F_l']}, vocab {local['V_l']}",
        "",
    ]


def _memory(p) -> list[str]:
    m, hw = p.memory, p.hardware
    keys = ["params", "grads", "optimizer", "activations", "logits", "kv_cache", "inputs", "total"]
    return (
        ["memory per device"]
        + _table(("", "bytes"), [(k, format_bytes(m[k])) for k in keys if k in m])
        + [
            f"  peak during the {m['peak_phase']}; HBM {format_bytes(hw.hbm_bytes)} -> "
            f"{'fits' if p.fits else 'DOES NOT FIT'} ({m['total'] / hw.hbm_bytes:.0%})"
        ]
    )


def _flops(p) -> list[str]:
    f = p.flops
    return [
        "",
        f"FLOPs per step: model {f['model']:.3e} (matmul {f['matmul']:.3e}, attention {f['attention']:.3e}), "
        f"hardware {f['hardware']:.3e}, per device {f['per_device']:.3e}",
        f"  convention: {f['convention']}",
        "",
    ]


def _collectives(p) -> list[str]:
    c = p.collectives
    link = {f"{i['kind']}@{i['axis']}": c["by_axis"][i["axis"]]["link"] for i in c["items"]}
    rows = []
    for key, v in c["per_step"].items():
        layer = c["per_layer"].get(key, {"count": 0, "bytes": 0})
        rows.append(
            (
                key,
                layer["count"],
                format_bytes(layer["bytes"]),
                v["count"],
                format_bytes(v["bytes"]),
                link[key],
            )
        )
    head = ("kind@axis", "per layer", "bytes", "per step", "bytes", "link")
    return ["collectives (bytes = unsharded buffer produced)"] + (_table(head, rows) if rows else ["  none"])


def _time(p) -> list[str]:
    t = p.time
    lines = ["", "time per step"] + _table(
        ("", "seconds"),
        [
            ("compute", format_seconds(t["compute_s"])),
            ("memory (HBM)", format_seconds(t["memory_s"])),
            ("communication", format_seconds(t["communication_s"])),
            ("  on the critical path", format_seconds(t["communication_critical_s"])),
            ("serial", format_seconds(t["serial_s"])),
            ("overlapped", format_seconds(t["overlapped_s"])),
            ("predicted", format_seconds(t["predicted_s"])),
        ],
    )
    lines.append(
        f"  MFU predicted {p.mfu:.1%} (serial {t['mfu_serial']:.1%}, overlapped {t['mfu_overlapped']:.1%}); "
        f"bound by {t['bound']}" + (f"; MBU {t['mbu']:.1%}" if "mbu" in t else "")
    )
    if p.comm_bound_ratio is not None:
        mega = t["comm_bound_ratio_megatron"]
        lines.append(
            f"  TP ratio R = T_{'work' if p.setting['decode'] else 'math'}/T_comm = {p.comm_bound_ratio:.2f} "
            f"({'COMMUNICATION-BOUND' if p.comm_bound else 'not communication-bound'})"
            + (
                f"; Megatron forward formula (docs/planner.md section 3) {mega:.2f}"
                if mega is not None
                else ""
            )
        )
    return lines
