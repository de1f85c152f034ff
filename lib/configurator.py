"""
nanoGPT's configurator as a function: a script keeps its defaults as module globals and calls

    overrides = configure(globals(), sys.argv[1:], RULES)

Each argument is a config file (lines of `key = value`) or `--key=value`. Values are Python literals
(strings may go unquoted). A key that is not a default, or a value of another type, is an error;
an int is accepted where a float is expected (--p=1). Returns the dict of keys that were set.

RULES maps a setting to what its value must be (`between(0, 1)`, `one_of("a", "b")`, `optional(...)`,
`new_dir()`, ...). Every rule is checked, defaults included, before the script does any work, and a
failure is one ConfigError naming the setting. cli(main) runs a script's main and turns the user's
errors (ConfigError and other ValueErrors, OSError: a missing file, a full disk) into one line and
exit status 1, without a traceback.
"""

import ast
import json
import math
import os
import sys


class ConfigError(ValueError):
    pass


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string: --act=relu


def set_key(config, key, value, where):
    if key not in config:
        known = ", ".join(sorted(k for k, v in config.items() if is_setting(k, v)))
        raise ConfigError(f"{where}: unknown key {key!r}; known keys: {known}")
    default = config[key]
    if default is not None and not isinstance(value, type(default)):
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not (isinstance(default, str) and value is None):
            raise ConfigError(f"{where}: {key} must be {type(default).__name__} like {default!r}, got {value!r}")
    config[key] = value


def is_setting(key, value):
    """A script's settings are its lowercase globals of plain types (constants are UPPERCASE)."""
    return key.islower() and not key.startswith("_") and isinstance(value, (int, float, str, bool, type(None)))


def configure(config, argv, rules=None):
    overrides = {}
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"{arg}: expected --key=value")
            key, text = arg[2:].split("=", 1)
            value = parse_value(text)
            if isinstance(config.get(key), str) and value is not None and not isinstance(value, str):
                value = text  # a string setting takes the text as typed: --seeds=1337,1338, --batches=1
            set_key(config, key, value, arg)
            overrides[key] = config[key]
        else:
            try:
                tree = ast.parse(open(arg).read(), arg)
            except (OSError, SyntaxError) as e:
                raise ConfigError(f"config file {arg}: {e}") from None
            for node in tree.body:
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                    raise ConfigError(f"{arg}:{node.lineno}: only `key = literal` lines are allowed")
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    raise ConfigError(f"{arg}:{node.lineno}: the value is not a literal") from None
                set_key(config, node.targets[0].id, value, f"{arg}:{node.lineno}")
                overrides[node.targets[0].id] = config[node.targets[0].id]
    check_rules(config, rules or {}, overrides)
    return overrides


# -----------------------------------------------------------------------------
# rules: each takes a value and returns None when it is fine, else what the value must be


def between(lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    """A number (an int when integer) in the range; NaN never is. lo / hi None: unbounded."""
    def rule(v):
        want = ("an int" if integer else "a number") + (
            f" in {'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{')' if hi_open else ']'}"
            if lo is not None or hi is not None else "")
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or math.isnan(v):
            return want
        if lo is not None and (v < lo or lo_open and v == lo) or hi is not None and (v > hi or hi_open and v == hi):
            return want
        return None
    return rule


def positive_int(v):
    return between(1, integer=True)(v)


def one_of(*choices):
    return lambda v: None if any(v == c and type(v) is type(c) for c in choices) else \
        "one of " + ", ".join(map(repr, choices))


def optional(rule):
    """None, or what `rule` allows."""
    return lambda v: None if v is None or rule(v) is None else f"None or {rule(v)}"


def int_list(lo=1, hi=None):
    """A comma-separated list of ints in [lo, hi], e.g. "1,4,16"."""
    def rule(v):
        try:
            items = [int(x) for x in str(v).split(",")]
        except ValueError:
            items = []
        ok = items and all(lo <= x and (hi is None or x <= hi) for x in items)
        return None if ok else f"a comma-separated list of ints in [{lo}, {'inf' if hi is None else hi}]"
    return rule


def existing_file(v):
    return None if isinstance(v, str) and os.path.isfile(v) else "an existing file"


def existing_dir(v):
    return None if isinstance(v, str) and os.path.isdir(v) else "an existing folder"


def new_dir(v):
    """A folder that exists or can be made: no part of the path is a regular file, and the deepest
    existing folder is writable (so an --out_dir under a file fails here, not after the work)."""
    if not isinstance(v, str) or not v:
        return "a folder path"
    path = os.path.abspath(v)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"a folder path, but {path} is a file"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"a folder path, but {path} is not writable"
    return None


def new_file(v):
    """A file that can be written: its folder exists or can be made, and it is not a folder."""
    if not isinstance(v, str) or not v or os.path.isdir(v):
        return "a file path"
    return new_dir(os.path.dirname(os.path.abspath(v)))


def device(v):
    """auto, cpu, cuda, cuda:N or mps, present in this torch."""
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = torch.backends.mps.is_available()
    ok = v in ("auto", "cpu") or v == "mps" and mps or isinstance(v, str) and (
        v == "cuda" and n > 0 or v.startswith("cuda:") and v[5:].isdigit() and int(v[5:]) < n)
    return None if ok else (f"auto, cpu, {'cuda or cuda:0..' + str(n - 1) if n else 'cuda (this torch sees no CUDA device)'}"
                            f"{', mps' if mps else ''}")


def either(*rules):
    """Allowed by any of the rules."""
    def check(v):
        fails = [r(v) for r in rules]
        return None if None in fails else " or ".join(fails)
    return check


def check_rules(config, rules, first=()):
    """Raise a ConfigError for the first setting its rule refuses: those in `first` (what the
    user set) before the defaults, so the error names what was typed."""
    for key in sorted(rules, key=lambda k: k not in first):
        rule = rules[key]
        why = rule(config[key])
        if why is not None:
            raise ConfigError(f"{key} must be {why}, got {config[key]!r}")


def cli(main):
    """Run main(sys.argv[1:]); the user's errors are one line on stderr and exit status 1."""
    try:
        return main(sys.argv[1:])
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        sys.exit(f"error: {e}")


def strict_json(obj, **kw):
    """obj as strict JSON text (RFC 8259 has no NaN or Infinity, which json.dumps would write and strict
    parsers reject): a float that is not finite becomes null, the value undefined; numpy and torch
    values become Python numbers and lists. Every JSON the project writes goes through this."""
    def clean(o):
        if hasattr(o, "tolist"):  # numpy and torch scalars and arrays
            o = o.tolist()
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return None if isinstance(o, float) and not math.isfinite(o) else o
    return json.dumps(clean(obj), allow_nan=False, **kw)
