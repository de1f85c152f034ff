"""
nanoGPT's configurator as a function: a script keeps its defaults as module globals and calls

    overrides = configure(globals(), sys.argv[1:])

Each argument is a config file (lines of `key = value`) or `--key=value`. Values are Python literals
(strings may go unquoted). A key that is not a default, or a value of another type, is an error;
an int is accepted where a float is expected (--p=1). Returns the dict of keys that were set.
"""

import ast


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


def configure(config, argv):
    overrides = {}
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"{arg}: expected --key=value")
            key, text = arg[2:].split("=", 1)
            set_key(config, key, parse_value(text), arg)
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
    return overrides
