"""train.py as the tests and benchmarks reach it: its definitions as a module, and copies of it with
definitions or lines of code replaced. Nothing here reads train.py's comments or headers, so an
agent may reword any of them.

- load_definitions(path): train.py is a flat script whose first statement of Setup is the call
  prepare.parse_command_line(...). The file is run with that function made to stop the run, so the
  module holds everything defined before Setup (formulas, kernels, model, optimizer,
  hyperparameters).
- replace_definitions(source, new): the top-level functions and assignments in `new` take the
  place of the ones of the same names in source (found by Python's parser).
- edit_code(source, old, new): whole lines of code (or a fragment of one line) replaced, matched
  with comments and blank lines ignored; the match must be unique.
"""

import ast
import io
import os
import sys
import tokenize
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "train.py")
sys.path.insert(0, ROOT)
import prepare  # noqa: E402


class _SetupReached(Exception):
    pass


def _stop(*args, **kwargs):
    raise _SetupReached


_LOADED = []


def load_definitions(path=TRAIN_PY):
    """train.py's definitions, run in a fresh module (its own globals, ops registered under its names)."""
    module = types.ModuleType("train_definitions")
    module.__file__ = path
    sys.modules[module.__name__] = module  # torch.compile looks classes up by their module's name
    start, prepare.parse_command_line = prepare.parse_command_line, _stop
    try:
        exec(compile(open(path).read(), path, "exec"), module.__dict__)
    except _SetupReached:
        pass
    else:
        raise AssertionError(f"{path} never called prepare.parse_command_line: where does its Setup start?")
    finally:
        prepare.parse_command_line = start
    # Each load registers train.py's custom ops again under the same names (the latest wins), and a
    # collected module would take its registration with it, pulling the ops from under the others.
    _LOADED.append(module)
    return module


def _definition_lines(source):
    """{name: (first line, last line)} of the top-level functions, classes and single-name assignments."""
    spans = {}
    for node in ast.parse(source).body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            spans[node.name] = (first, node.end_lineno)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            spans[node.targets[0].id] = (first, node.end_lineno)
    return spans


def replace_definitions(source, new):
    lines = source.splitlines(keepends=True)
    new = new.strip("\n") + "\n"
    new_lines = new.splitlines(keepends=True)
    old_spans, new_spans = _definition_lines(source), _definition_lines(new)
    missing = sorted(set(new_spans) - set(old_spans))
    if missing:
        raise AssertionError(f"train.py defines no {', '.join(missing)}: update this replacement")
    for name, (first, last) in sorted(new_spans.items(), key=lambda item: -old_spans[item[0]][0]):  # bottom up
        block = "".join(new_lines[first - 1 : last]).rstrip("\n") + "\n"
        start, end = old_spans[name]
        lines[start - 1 : end] = [block]
    return "".join(lines)


def _code_lines(source):
    """Each line of source without its comment and trailing spaces (Python's tokenizer finds the
    comments; a snippet that ends inside brackets keeps what the tokenizer read before it gave up)."""
    lines = source.splitlines()
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                row, col = token.start
                lines[row - 1] = lines[row - 1][:col]
    except (tokenize.TokenError, IndentationError):
        pass
    return [line.rstrip() for line in lines]


def edit_code(source, old, new):
    lines = source.splitlines(keepends=True)
    code = _code_lines(source)
    if "\n" not in old:  # a fragment of one line
        found = [i for i, line in enumerate(code) if old in line]
        if len(found) != 1:
            raise AssertionError(f"train.py changed: {old!r} is in {len(found)} lines of code, not one")
        lines[found[0]] = lines[found[0]].replace(old, new, 1)
        return "".join(lines)
    wanted = [line for line in _code_lines(old) if line.strip()]
    kept = [i for i, line in enumerate(code) if line.strip()]  # blank and comment-only lines are skipped
    starts = [n for n in range(len(kept) - len(wanted) + 1)
              if [code[i] for i in kept[n : n + len(wanted)]] == wanted]
    if len(starts) != 1:
        raise AssertionError(f"train.py changed: {wanted[0]!r}... matches {len(starts)} places, not one")
    first, last = kept[starts[0]], kept[starts[0] + len(wanted) - 1]
    lines[first : last + 1] = [new]
    return "".join(lines)


def train_config(tr, seq_len, vocab_size, fused=()):
    """train.py's GPTConfig from its hyperparameters, as its Setup section builds it; fused names the
    fused kernels to use ('mlp', 'loss')."""
    dim = -(-tr.DEPTH * tr.ASPECT_RATIO // tr.HEAD_DIM) * tr.HEAD_DIM
    return tr.GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=tr.DEPTH, n_head=dim // tr.HEAD_DIM,
                        n_kv_head=dim // tr.HEAD_DIM, n_embd=dim, window_pattern=tr.WINDOW_PATTERN,
                        fused_mlp="mlp" in fused, fused_loss="loss" in fused)


def training_losses(attention, batches, config, device, compile, path=TRAIN_PY):
    """Per-step losses of train.py's GPT and MuonAdamW (constant learning rates) on the given
    batches, with `attention` as the model's attention and the fused kernels that config names.
    Same seed every call."""
    tr = load_definitions(path)  # a fresh copy: its own globals and compiled code
    torch.manual_seed(0)
    with torch.device(device):
        model = tr.GPT(config, attention)
    model.init_weights()
    if device.type == "cuda":  # as train.py does
        model.transformer.wte.to(torch.bfloat16)
        model.value_embeds.to(torch.bfloat16)
    optimizer = tr.build_optimizer(model, compile_math=compile)
    run_model = torch.compile(model, dynamic=False) if compile else model
    losses = []
    for x, y in batches:
        with prepare.autocast(device):
            loss = run_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
