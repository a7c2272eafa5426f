"""K decode steps in one launch: why it is safe for a program, checked before any such launch.

The VM (vm/amk_vm.cu) runs a program's queues K times in one launch. Counters are never reset,
so in step s a wait (c, t) becomes (c, t + s * counter_step[c]), where counter_step[c] is the
number of tasks that signal c (each signals once per step). A block starting step s >= 1 first
waits until the ARGMAX counter reaches s * counter_step[argmax counter] (the step barrier). Right
after the ARGMAX op of step s its thread writes the token to tokens_out[s] and advances the runtime
inputs in place (token = next token, pos += 1, seq_len += 1), then signals.

What makes that K copies of the proven step, checked here on the program (plain Python):

(a) ``step_plan``: there is exactly one ARGMAX task, it signals a counter that nothing else
    signals, and every other task happens-before it. Happens-before is taken conservatively:
    queue order, and a wait whose threshold is the counter's full signaller count orders every
    signaller (how ``lower`` builds programs). So step s is complete when the barrier of step
    s + 1 opens; while a step-s task waits, counter c holds s * counter_step[c] plus step s's own
    signals, exactly the one-step semantics, and tasks two or more steps apart are ordered
    through the barriers in between.
(b) ``unroll``: the explicit two-step program (step 2's thresholds shifted; the barrier as a NOP
    at the head of each queue's step 2 waiting for the ARGMAX counter; the in-place input update
    as three ARGMAX-shaped tasks right after the ARGMAX task, the last carrying its signal; token,
    pos and seq_len made KV buffers so their writes are race-checked) passes ``validate``. By (a)
    only consecutive steps interact, so two steps cover every K. tokens_out is not modelled: each
    element is written once (by the ARGMAX of its step) and read only by the host after the launch.

``prove`` does both; ``check_request`` refuses a bad K or one that would run past max_seq.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pytest_amk import ir
from pytest_amk.ir import BufferKind, Program, Region, Task, Wait

INT32_MAX = 2**31 - 1
INPUT_NAMES = ("token", "pos", "seq_len")


class MultiStepError(ValueError):
    """The program cannot run K steps in one launch, or the K-step request is out of range."""


@dataclass(frozen=True)
class StepPlan:
    """What a K-step launch needs, derived from the program (see the module docstring)."""

    counter_step: tuple[int, ...]  # signals per step, by counter id
    argmax_task: int
    barrier_counter: int  # the ARGMAX task's signal counter
    next_token: int  # buffer id the ARGMAX writes
    inputs: dict[str, int | None]  # "token" / "pos" / "seq_len" -> buffer id (None: absent)
    max_seq: int | None
    max_threshold: int  # largest one-step wait threshold


def counter_steps(program: Program) -> list[int]:
    """Signals each counter receives in one step (one per signalling task)."""
    n = 1 + max((c.id for c in program.counters), default=-1)
    out = [0] * n
    for t in program.tasks:
        if t.signal is not None and 0 <= t.signal < n:
            out[t.signal] += 1
    return out


def _tl(t: Task) -> str:
    return f"task {t.id} ({t.op}, sm {t.sm})"


def _counter(program: Program, c: int) -> str:
    name = next((x.name for x in program.counters if x.id == c), "?")
    return f"counter {c} '{name}'"


def _buffer_id(program: Program, name: str) -> int | None:
    try:
        return program.buffer(name).id
    except KeyError:
        return None


def _max_seq(program: Program) -> int | None:
    from pytest_amk.gpu.checks import input_limits

    seqs = [s for s in (input_limits(program)[1], program.meta.get("max_seq")) if isinstance(s, int)]
    return min(seqs) if seqs else None


def step_plan(program: Program) -> StepPlan:
    """Check fact (a) of the module docstring; raises MultiStepError naming what breaks it."""
    tasks = program.tasks
    argmaxes = [t for t in tasks if t.op == "ARGMAX"]
    if len(argmaxes) != 1:
        raise MultiStepError(f"a K-token launch needs exactly one ARGMAX task (its output feeds the next step); "
                             f"the program has {len(argmaxes)}")
    am = argmaxes[0]
    if am.signal is None:
        raise MultiStepError(f"the argmax {_tl(am)} signals no counter: the step barrier of a K-token launch "
                             f"waits on its counter")
    cs = counter_steps(program)
    others = [t for t in tasks if t.signal == am.signal and t.id != am.id]
    if others:
        raise MultiStepError(f"{_counter(program, am.signal)} of the argmax {_tl(am)} is also signalled by "
                             f"{_tl(others[0])}: the step barrier needs a counter of the argmax alone")
    # Ancestors of the argmax by queue order and full-count waits (conservative happens-before).
    signallers: dict[int, list[int]] = {}
    for t in tasks:
        if t.signal is not None:
            signallers.setdefault(t.signal, []).append(t.id)
    qpred: dict[int, int] = {}
    for q in program.queues():
        for a, b in zip(q, q[1:], strict=False):
            qpred[b.id] = a.id
    seen, stack = {am.id}, [am.id]
    while stack:
        t = tasks[stack.pop()]
        preds = [qpred[t.id]] if t.id in qpred else []
        for w in t.waits:
            if 0 <= w.counter < len(cs) and w.threshold >= cs[w.counter]:
                preds += signallers.get(w.counter, [])
        for p in preds:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    missing = [t for t in tasks if t.id not in seen]
    if missing:
        # Name the most downstream ones first: the cause is usually at the end of some chain.
        shown = sorted(missing, key=lambda t: -t.id)[:3]
        why = []
        for t in shown:
            if t.signal is None:
                why.append(f"{_tl(t)} signals nothing and no later task in its queue leads to the argmax")
            else:
                why.append(f"{_tl(t)} signals {_counter(program, t.signal)}, which no task leading to the "
                           f"argmax waits for with its full count {cs[t.signal]}")
        raise MultiStepError(
            f"{len(missing)} task(s) do not happen-before the argmax {_tl(am)}, so step k + 1 could start "
            f"before they finish: " + "; ".join(why))
    return StepPlan(
        counter_step=tuple(cs), argmax_task=am.id, barrier_counter=am.signal,
        next_token=int(am.params["out"]), inputs={n: _buffer_id(program, n) for n in INPUT_NAMES},
        max_seq=_max_seq(program), max_threshold=max((w.threshold for t in tasks for w in t.waits), default=0))


def unroll(program: Program, plan: StepPlan, steps: int = 2) -> Program:
    """The explicit ``steps``-step program of a K-step launch (fact (b) of the module docstring)."""
    cs = plan.counter_step
    inputs = {bid for bid in plan.inputs.values() if bid is not None}
    # Host-written inputs become state the program itself updates: KV (mutable, persistent).
    buffers = [dataclasses.replace(b, kind=BufferKind.KV) if b.id in inputs else b for b in program.buffers]
    am = program.tasks[plan.argmax_task]
    amax = Region(int(am.params["amax"]), 0, 2 * int(am.params["n_tiles"]))
    update = [(plan.inputs["token"], plan.next_token)] + [(plan.inputs[n], plan.inputs[n]) for n in ("pos", "seq_len")]
    update = [(dst, src) for dst, src in update if dst is not None]
    out: list[Task] = []

    def add(t: Task, **kw: object) -> None:
        out.append(dataclasses.replace(t, id=len(out), **kw))

    first_sm = {q[0].sm for q in program.queues() if q}
    for s in range(steps):
        if s:
            for sm in sorted(first_sm):  # the step barrier of each queue
                add(Task(0, "NOP", sm, [], [], [Wait(plan.barrier_counter, s * cs[plan.barrier_counter])], None, {}))
        for t in program.tasks:
            waits = [Wait(w.counter, w.threshold + s * cs[w.counter]) for w in t.waits]
            if t.id != plan.argmax_task or not update:
                add(t, waits=waits, reads=list(t.reads), writes=list(t.writes), params=dict(t.params))
                continue
            add(t, waits=waits, reads=list(t.reads), writes=list(t.writes), params=dict(t.params), signal=None)
            for i, (dst, src) in enumerate(update):  # dst[0] = f(src[0]), in the argmax's thread, then its signal
                add(Task(0, "ARGMAX", t.sm, [amax, Region(src, 0, 1)], [Region(dst, 0, 1)], [],
                         t.signal if i == len(update) - 1 else None,
                         {"amax": amax.buffer, "n_tiles": int(am.params["n_tiles"]), "out": dst}))
    meta = dict(program.meta)
    meta["unrolled_steps"] = steps
    return Program(buffers, list(program.counters), out, meta)


_PROVEN: dict[tuple[str, str | None], StepPlan] = {}  # (program digest, target) -> plan; a few entries


def prove(program: Program, target: ir.GpuTarget | None = None) -> StepPlan:
    """Facts (a) and (b): the program may run K steps in one launch. Raises MultiStepError.
    Proofs are kept by program content (the 1B-shape's two-step validation takes seconds)."""
    from pytest_amk.validate import validate

    key = (program.digest(), target.name if target is not None else None)
    if key in _PROVEN:
        return _PROVEN[key]
    plan = step_plan(program)
    result = validate(unroll(program, plan), target)
    if not result.ok:
        n = len(program.tasks) + len([x for x in (plan.inputs.values()) if x is not None])
        raise MultiStepError(f"the two-step unrolled program (tasks 0..{n - 1}: step 1 with the input update, then "
                             f"a barrier NOP per queue and step 2) is not proven safe: " + result.summary())
    if len(_PROVEN) >= 8:
        _PROVEN.pop(next(iter(_PROVEN)))
    _PROVEN[key] = plan
    return plan


def check_k(k: int) -> int:
    """``k`` when it is a valid number of tokens per launch; MultiStepError otherwise."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MultiStepError(f"tokens per launch must be an integer >= 1, got {k!r}")
    return k


def check_request(plan: StepPlan, pos: int, k: int) -> None:
    """Refuse a K-step request the launch cannot run: K < 1, positions pos..pos+K-1 past max_seq,
    or counters that would pass int32."""
    check_k(k)
    if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
        raise MultiStepError(f"position must be an integer >= 0, got {pos!r}")
    if plan.max_seq is not None and pos + k > plan.max_seq:
        raise MultiStepError(f"{k} tokens from position {pos} need positions {pos}..{pos + k - 1}, but max_seq is "
                             f"{plan.max_seq}: at most {max(0, plan.max_seq - pos)} tokens from there")
    if plan.max_threshold + (k - 1) * max(plan.counter_step, default=0) > INT32_MAX:
        raise MultiStepError(f"{k} steps would take the counters past int32")
