"""bench_learner.py --plan's report: one row of figures per shape from a memory plan
(toolgrpo.learners.plan.plan_step), in GiB, and the table it prints without --json."""

from __future__ import annotations


def plan_row(
    plan: dict, *, rows: int, length: int, rank: int, layers: int, dtype: str, target: str | None
) -> dict:
    """The report's row for one shape: each program's compile time and temporaries, arguments
    and outputs (GiB; per chip for a `target` slice, with the peak against the chip's HBM)."""
    gib = 2.0**30
    row = {
        "batch": rows,
        "seq_len": length,
        "rank": rank,
        "layers": layers,
        "dtype": dtype,
        "backend": plan["backend"],
        "device": plan["device"],
        "lower_s": plan["lower_s"],
    }
    for program, figures in plan["programs"].items():
        row[f"{program}_compile_s"] = figures["compile_s"]
        for figure in ("temp", "argument", "output"):
            row[f"{program}_{figure}_gib"] = figures[f"{figure}_bytes"] / gib
    row["argument_gib"] = row["update_argument_gib"]
    row["compile_s"] = plan["compile_s"]
    row["programs"] = list(plan["programs"])
    if target:  # per chip, against its HBM
        row.update(
            target=target,
            devices=plan["devices"],
            mesh=plan["mesh"],
            state_gib=plan["state_bytes"] / gib,
            unsharded_argument_gib=plan["programs"]["update"]["unsharded_argument_bytes"] / gib,
            peak_gib=max(
                (p["temp_bytes"] + p["argument_bytes"] + p["output_bytes"]) / gib
                for p in plan["programs"].values()
            ),
            hbm_gib=None if plan["hbm_bytes"] is None else plan["hbm_bytes"] / gib,
        )
        row["hbm_frac"] = row["peak_gib"] / row["hbm_gib"] if row["hbm_gib"] else None
    return row


def print_plan(report: dict) -> None:
    """The report as a table: a line per shape, a line per program."""
    for name, r in report["shapes"].items():
        where = r["backend"]
        if "target" in r:
            where = (
                f"{r['target']} ({r['devices']} x {r['device']}, mesh data {r['mesh']['data']}"
                f" x fsdp {r['mesh']['fsdp']}; figures per chip)"
            )
        print(
            f"{name}: {r['layers']} layers, {r['batch']} x {r['seq_len']}, {r['dtype']}, "
            f"{where} (lowering {r['lower_s']:.1f} s)"
        )
        for program in r["programs"]:
            print(
                f"  {program:13} temporaries {r[f'{program}_temp_gib']:7.2f} GiB  "
                f"arguments {r[f'{program}_argument_gib']:6.2f} GiB  "
                f"outputs {r[f'{program}_output_gib']:6.2f} GiB  "
                f"compile {r[f'{program}_compile_s']:6.1f} s"
            )
        if "target" in r:
            hbm = (
                f" of the chip's {r['hbm_gib']:.0f} GiB HBM ({100 * r['hbm_frac']:.0f}%)"
                if r["hbm_gib"]
                else " (HBM of this generation unknown)"
            )
            print(
                f"  peak per chip (temporaries + arguments + outputs of the largest program)"
                f" {r['peak_gib']:.2f} GiB{hbm}; the whole state is {r['state_gib']:.2f} GiB"
            )
