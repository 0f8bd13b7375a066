"""The whole pipeline for a catalog: spec -> derivation -> plan -> lowering -> module text.

Everything is rendered in memory; `files.py` decides what reaches the disk. Ops are rendered independently,
in worker processes when there is more than one CPU (`jobs`); the files are the same bytes either way.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

from . import naming
from .emit import render_module
from .errors import SpecError
from .explain import Section, derivation_section, explain, render_derivations
from .model import Catalog, OpSpec
from .naming import STYLE_DIRS  # noqa: F401 (re-exported: callers import it from here)
from .naming import ALL_STYLES, DEFAULT_NAMESPACE, MODULE_STYLES, STYLES
from . import pipeline
from .pipeline import DEFAULT_BUDGET, Built, build_op, spec_errors, time_limit
from .stamp import header, planned, stamped

JOBS_VARIABLE = "DERIVE_JOBS"    # the environment's default for `jobs` (the command line's --jobs)


def render_catalog(catalog: Catalog, styles=ALL_STYLES, spec_arg: str | None = None,
                   out_arg: str = "generated", namespace: str = DEFAULT_NAMESPACE,
                   budget: float | None = DEFAULT_BUDGET,
                   progress: Callable[[str, int, int], None] | None = None,
                   jobs: int | None = None) -> dict[str, str]:
    """Relative path -> file text for every generated file of the catalog, each stamped with its inputs;
    `progress(op, number, total)` is called as each op begins (in the process that renders it). `jobs`:
    how many processes render ops at once (default: $DERIVE_JOBS, else one per CPU; see `_processes`)."""
    source, command = header(spec_arg, out_arg, namespace)
    inputs = planned({op.name: op.digest for op in catalog.ops}, styles, source, command, namespace)
    work = _Work(catalog.ops, tuple(styles), source, command, namespace, inputs, budget, progress)
    files = {}
    sections = []
    for rendered in _rendered_ops(work, _processes(jobs, len(catalog.ops))):
        op_files, section = rendered
        files.update(op_files)
        if section is not None:
            sections.append(section)
    if sections:    # beside the contraction-style modules, once per catalog
        document = naming.derivations_file(namespace)
        with spec_errors(None, catalog.path):
            files[document] = stamped(document, render_derivations(sections, source, command), inputs[document])
    return files


class _Work:
    """What rendering each op of a catalog reads; a worker process inherits it when it forks."""

    def __init__(self, ops: tuple[OpSpec, ...], styles: tuple[str, ...], source: str, command: str,
                 namespace: str, inputs: dict[str, str], budget: float | None, progress):
        self.ops, self.styles, self.source, self.command = ops, styles, source, command
        self.namespace, self.inputs, self.budget, self.progress = namespace, inputs, budget, progress

    def render(self, number: int) -> tuple[dict[str, str], Section | None]:
        """The module files of op `number` (from 0) and its section of DERIVATIONS.md."""
        op = self.ops[number]
        if self.progress is not None:
            self.progress(op.name, number + 1, len(self.ops))
        stage = [""]     # where the time goes, for the message when it runs out
        files = {}
        with spec_errors(op), time_limit(op, self.budget, stage):
            built = build_op(op, STYLES, None, stage)     # every style: the derivations document shows both
            stage[0] = "rendering the modules and the derivations document"
            for style in self.styles:
                path, files[path] = module_file(built, style, self.source, self.command, self.namespace,
                                                self.inputs)
            section = derivation_section(explain(built)) if "contraction" in self.styles else None
        return files, section


def _processes(jobs: int | None, ops: int) -> int:
    """How many processes render: `jobs`, else $DERIVE_JOBS, else the CPUs this process may run on; at most
    one per op. One (this process) where a worker could not be forked safely: without fork (Windows, macOS'
    default), once torch is imported (its thread pools do not survive a fork), or when `build_op` is
    replaced (the tests share builds across renderings in-process)."""
    if jobs is None and os.environ.get(JOBS_VARIABLE, "").strip():
        jobs = parse_jobs(os.environ[JOBS_VARIABLE], JOBS_VARIABLE)
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    forkable = "fork" in multiprocessing.get_all_start_methods() and "torch" not in sys.modules \
        and build_op is pipeline.build_op
    return max(1, min(jobs, ops)) if forkable else 1


def parse_jobs(text: str, where: str) -> int:
    """A number of processes, as --jobs or $DERIVE_JOBS gives it."""
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise SpecError(f"the number of processes must be a positive integer, not {text!r}", path=where)
    return jobs


_WORK: _Work | None = None     # the rendering a forked worker serves


def _rendered_ops(work: _Work, processes: int):
    """Each op's files and section, in catalog order; the first op (in that order) that fails raises its
    SpecError, as rendering them one by one would."""
    if processes == 1:
        yield from (work.render(number) for number in range(len(work.ops)))
        return
    global _WORK
    _WORK = work
    try:
        with multiprocessing.get_context("fork").Pool(processes, initializer=_leave_interrupts_to_parent) as pool:
            for outcome in pool.imap(_render_in_worker, range(len(work.ops))):
                if isinstance(outcome, _Failure):
                    raise outcome.error()
                yield outcome
    finally:
        _WORK = None


class _Failure:
    """A worker's SpecError, by its fields (an exception pickles by its message alone)."""

    def __init__(self, error: SpecError):
        self.fields = dict(message=error.message, path=error.path, line=error.line, column=error.column,
                           op=error.op)

    def error(self) -> SpecError:
        fields = dict(self.fields)
        return SpecError(fields.pop("message"), **fields)


def _leave_interrupts_to_parent():
    """Ctrl-C interrupts the parent, which stops the workers: one KeyboardInterrupt, not one per process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _render_in_worker(number: int):
    try:
        return _WORK.render(number)
    except SpecError as error:
        return _Failure(error)


def module_file(built: Built, style: str, source: str, command: str, namespace: str,
                inputs: dict[str, str]) -> tuple[str, str]:
    """The relative path and stamped text of one op's module in one style (`inputs`: `planned`'s hashes)."""
    printed = MODULE_STYLES[style]      # (the fused style prints the contraction style's lowering)
    path = printed.directory + naming.module_file(built.op.name)
    lowered, signature = built.printed(printed)    # the fused style's own, where it saves more
    variants = tuple((absent, v.derivation, *v.printed(printed)) for absent, v in built.variants)
    text = stamped(path, render_module(built.derivation, lowered, source, command, namespace,
                                       signature, variants, printed), inputs[path])
    compile(text, path, "exec")    # a module that would not import is never written
    return path, text
