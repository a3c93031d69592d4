"""`kdflow <verb> --config FILE [key=value ...]`: parse, validate, dispatch. Nothing else.

Each verb names its typed config class and the function that runs it; heavy libraries are
imported only once a verb runs, so `kdflow --help` is instant.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

from kdflow.config import describe, dump_yaml, load_config
from kdflow.errors import KDFlowError


@dataclass(frozen=True)
class Verb:
    config: str  # "module:Class"
    runner: str  # "module:function"
    summary: str


VERBS: dict[str, Verb] = {
    "distill": Verb("kdflow.config:DistillConfig", "kdflow.methods.kd:run_distill",
                    "train a student from a teacher: sft, soft-label kd, hard_token, seqkd or gkd (on-policy); evaluates and reports"),
    "cache-teacher": Verb("kdflow.config:DistillConfig", "kdflow.methods.kd:run_cache_teacher",
                          "run the teacher once over data.train and store its top-k log-probs in teacher_cache.dir"),
    "serve-teacher": Verb("kdflow.config:ServeConfig", "kdflow.serving:run_serve_teacher",
                          "serve a local teacher's prompt log-probs over HTTP (the vLLM completions API subset that "
                          "teacher.server uses)"),
    "minillm": Verb("kdflow.config:MiniLLMConfig", "kdflow.methods.minillm:run_minillm",
                    "MiniLLM: reverse-KL distillation by policy gradient on teacher-mixed rollouts; evaluates and reports"),
    "codistill": Verb("kdflow.config:CoDistillConfig", "kdflow.methods.codistill:run_codistill",
                      "train N >= 2 models together, each distilling from the others; evaluates every peer and reports"),
    "fedmkt": Verb("kdflow.config:FedMKTConfig", "kdflow.federated.simulation:run_fedmkt",
                   "federated mutual knowledge transfer between a server LLM and client small models (in-process)"),
    "fedmkt-flower": Verb("kdflow.config:FedMKTConfig", "kdflow.federated.flower_launch:run_fedmkt_flower",
                          "the same FedMKT rounds over Flower: a local simulation, or a SuperLink (flower.superlink) "
                          "with one SuperNode per client"),
    "compare": Verb("kdflow.config:CompareConfig", "kdflow.compare:run_compare",
                    "run several methods x seeds on one task (shared adapted teacher and teacher cache) and write a "
                    "leaderboard with paired intervals against plain SFT; resumable"),
    "eval": Verb("kdflow.config:EvalRunConfig", "kdflow.evaluate:run_eval",
                 "evaluate one model on a test split: answer NLL, perplexity, Rouge-L, exact match, sampled metrics"),
    "export": Verb("kdflow.config:ExportConfig", "kdflow.compress.quantize:run_export",
                   "write a weight-only int8 or int4 copy of a model (torchao), which from_pretrained and every verb load"),
}


def _load(ref: str) -> Callable:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: kdflow <verb> [--config FILE] [key=value ...] [--print-config] [--help]", "", "verbs:"]
    lines += [f"  {name:<{width}}  {verb.summary}" for name, verb in VERBS.items()]
    lines += ["", "`kdflow <verb> --help` lists every setting of that verb with its default."]
    return "\n".join(lines)


def _verb_help(name: str, verb: Verb) -> str:
    cls = _load(verb.config)
    lines = [f"usage: kdflow {name} [--config FILE] [key=value ...] [--print-config]", "", verb.summary, "",
             "  --config FILE     YAML file of settings (see configs/)",
             "  key=value         override one setting, dotted for sections: train.max_steps=10 kd.divergence=rkl",
             "  --print-config    print the resolved settings and exit", "",
             "settings (YAML keys):"]
    for key, tp, default, help_text in describe(cls):
        if tp == "section":
            lines.append(f"\n  [{key}]  {help_text}")
            continue
        lines.append(f"  {key}  ({tp}; default {default})")
        if help_text:
            lines += textwrap.wrap(help_text, width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from kdflow import __version__

        print(f"kdflow {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in VERBS:
        print(f"kdflow: error: unknown verb '{name}'; choose from {', '.join(VERBS)}", file=sys.stderr)
        return 2
    verb = VERBS[name]
    if "-h" in rest or "--help" in rest:
        print(_verb_help(name, verb))
        return 0
    config_path, overrides, print_only = None, [], False
    it = iter(rest)
    for arg in it:
        if arg == "--config":
            config_path = next(it, None)
            if config_path is None:
                print("kdflow: error: --config needs a file", file=sys.stderr)
                return 2
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg == "--print-config":
            print_only = True
        elif arg.startswith("-"):
            print(f"kdflow: error: unknown option '{arg}'; options are --config FILE, --print-config, --help", file=sys.stderr)
            return 2
        else:
            overrides.append(arg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from kdflow import processes, runfolder

    held_before = runfolder.holding()
    # Under torchrun / accelerate launch every process runs this command; the main one alone prints
    # (tables, progress, notes). The others print only their own errors, marked with their index.
    quiet = contextlib.redirect_stdout(open(os.devnull, "w")) if not processes.is_main() else contextlib.nullcontext()
    if not processes.is_main():
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" once, from the main process
    who = "" if processes.is_main() else f"(process {processes.rank()} of {processes.world()}) "
    try:
        with quiet:
            cfg = load_config(_load(verb.config), config_path, overrides)
            if print_only:
                print(dump_yaml(cfg), end="")
                return 0
            _load(verb.runner)(cfg)
    except processes.MainProcessError:
        return 2  # the main process prints it
    except KDFlowError as e:
        _close_progress_bars()
        print(f"kdflow: error: {who}{e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the run reads or writes: a full disk, a read-only folder, ...
        _close_progress_bars()
        print(f"kdflow: error: {who}{os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkdflow: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        for folder in runfolder.holding() - held_before:  # the run folders this command took
            runfolder.release(folder)
    return 0


def _close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so that the error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


_ADVICE = {
    errno.ENOSPC: "the disk is full: free space on it, or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space, or write elsewhere",
    errno.EACCES: "no permission: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "not permitted: choose a folder you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "that is a folder: give a file",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.EIO: "an input/output error: check the disk",
    errno.EEXIST: "something is in the way there: remove it or choose another path",
}


def os_error_line(e: OSError) -> str:
    """One line for an OSError: the path it concerns, what happened, what to do."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e) or type(e).__name__
    advice = _ADVICE.get(e.errno)
    return f"{where}{what}" + (f" ({advice})" if advice else "")


if __name__ == "__main__":
    raise SystemExit(main())
