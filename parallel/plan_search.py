"""The planner's answers beyond one layout: the smallest single change that makes a layout run
and fit (memory knobs first, then micro-batches, then the layout), and the search that ranks the
layouts that fit by predicted tokens/s/GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from parallel.mesh import check_parallel_config
from parallel.plan import Plan, plan
from parallel.rank_memory import rank_memory_of
from parallel.step_time import Hardware
from train.config import Config, load_config, replace
from train.errors import ConfigError

K2_SETTINGS = {"recompute": "selective", "fp8_storage": True, "offload": True}


def candidate_changes(cfg: Config) -> list[tuple[str, dict]]:
    """Single changes, smallest first: memory knobs, then micro-batch count, then layout."""
    p, a = cfg.parallel, cfg.activations
    out: list[tuple[str, dict]] = []
    if a.recompute == "none":
        out.append(("--activations.recompute=selective", {"activations": {"recompute": "selective"}}))
    if not a.fp8_storage and a.recompute != "full":
        out.append(("--activations.fp8_storage=true", {"activations": {"fp8_storage": True}}))
    if not a.offload:
        out.append(("--activations.offload=true", {"activations": {"offload": True}}))
    if a.recompute == "selective" and not a.recompute_moe_down:
        out.append(("--activations.recompute_moe_down=true",
                    {"activations": {"recompute_moe_down": True}}))
    if a.recompute != "full":
        out.append(("--activations.recompute=full",
                    {"activations": {"recompute": "full", "fp8_storage": False}}))
    for mb in (p.microbatches * 2, p.microbatches // 2):
        if mb >= 1:
            out.append((f"--parallel.microbatches={mb}", {"parallel": {"microbatches": mb}}))
    for v in range(p.virtual_stages - 1, 0, -1):
        out.append((f"--parallel.virtual_stages={v}", {"parallel": {"virtual_stages": v}}))
    for ep in (p.ep * 2, p.ep // 2):
        if ep >= 1:
            out.append((f"--parallel.ep={ep}", {"parallel": {"ep": ep}}))
    for pp in (p.pp * 2, p.pp // 2):
        if pp >= 1:
            out.append((f"--parallel.pp={pp} (dp={p.pp * p.dp // pp})",
                        {"parallel": {"pp": pp, "dp": p.pp * p.dp // pp}}))
    return out


def _try_replace(cfg: Config, change: dict) -> Config | None:
    try:
        return replace(cfg, **change)
    except ConfigError:
        return None


def smallest_fix(cfg: Config, hw: Hardware, result: Plan) -> str | None:
    """The first single change (candidate_changes' order) that makes the layout run and fit."""
    for label, change in candidate_changes(cfg):
        new = _try_replace(cfg, change)
        if new is None:
            continue
        if not result.runs:
            try:
                check_parallel_config(new, new.parallel.pp * new.parallel.dp)
            except ConfigError:
                continue
        r = plan(new, hw)
        if r.runs and r.fits:
            return label
    return None


def _raw_parallel(path: str, overrides: list[str]) -> dict:
    """The [parallel] values a config file and its overrides give, before validation."""
    import tomllib

    from train.config import parse_overrides

    raw = tomllib.loads(Path(path).read_text()) if Path(path).is_file() else {}
    for section, values in parse_overrides(overrides).items():
        raw.setdefault(section, {}).update(values)
    return {**dataclasses.asdict(Config().parallel), **raw.get("parallel", {})}


def with_gpus(path: str, overrides: list[str], gpus: int) -> list[str]:
    """overrides plus --parallel.dp = gpus / pp (ConfigError when pp does not divide gpus)."""
    pp = _raw_parallel(path, overrides)["pp"]
    if not isinstance(pp, int) or pp < 1 or gpus % pp:
        raise ConfigError(f"--gpus {gpus} is not divisible by parallel.pp={pp!r}")
    return [*overrides, f"--parallel.dp={gpus // pp}"]


def fix_for_invalid(path: str, overrides: list[str], gpus: int, hw: Hardware) -> str | None:
    """For a config or layout that does not validate: the first single override (fewer
    virtual stages, another pp, micro-batch count) with which it validates, runs and fits."""
    par = _raw_parallel(path, overrides)
    cands = [f"--parallel.virtual_stages={v}" for v in range(par["virtual_stages"] - 1, 0, -1)]
    pps = sorted((x for x in range(1, gpus + 1) if gpus % x == 0 and x != par["pp"]),
                 key=lambda x: (abs(x - par["pp"]), x))
    cands += [f"--parallel.pp={x}" for x in pps[:6]]
    cands += [f"--parallel.microbatches={x}" for x in (par["microbatches"] // 2,
                                                        par["microbatches"] * 2) if x >= 1]
    for extra in cands:
        try:
            cfg = load_config(path, with_gpus(path, [*overrides, extra], gpus))
            r = plan(cfg, hw)
        except ConfigError:
            continue
        if r.runs and r.fits:
            return extra
    return None


def search(cfg: Config, hw: Hardware, gpus: int, limit: int = 10) -> list[Plan]:
    """Layouts on `gpus` GPUs that run and fit, best predicted tokens/s/GPU first: pp, virtual
    stages (1, 2, 4), ep (at most 64 local experts), pp or 2 pp micro-batches, and three memory
    settings (the config's, K2's, full recomputation)."""
    m = cfg.model
    found = []
    pps = [x for x in (1, 2, 4, 8, 16, 32) if gpus % x == 0]
    settings = [dict(cfg.activations.__dict__),
                {**cfg.activations.__dict__, **K2_SETTINGS},
                {**cfg.activations.__dict__, "recompute": "full", "fp8_storage": False}]
    seen = set()
    for pp in pps:
        dp = gpus // pp
        for v in (1, 2, 4):
            if m.num_layers < pp * v:
                continue
            for ep in (1, 2, 4, 8, 16, 32, 64):
                # at most 64 local experts per rank; EP must divide DP and the experts
                if dp % ep or m.n_routed_experts % ep or m.n_routed_experts > 64 * ep:
                    continue
                for mbk in (1, 2):
                    mb = pp * mbk
                    for s in settings:
                        key = (pp, v, ep, mb, tuple(sorted(s.items())))
                        if key in seen:
                            continue
                        seen.add(key)
                        new = _try_replace(cfg, {"parallel": {"pp": pp, "dp": dp, "ep": ep,
                                                              "virtual_stages": v,
                                                              "microbatches": mb},
                                                 "activations": s})
                        if new is None:
                            continue
                        try:
                            check_parallel_config(new, gpus)
                        except ConfigError:
                            continue
                        # the states of the middle rank alone: a cheap first filter
                        if rank_memory_of(new, (pp // 2) * dp).peak_state_bytes > hw.gpu.memory_bytes:
                            continue
                        r = plan(new, hw)
                        if r.runs and r.fits:
                            found.append(r)
    found.sort(key=lambda r: -r.tokens_per_s_per_gpu)
    return found[:limit]
