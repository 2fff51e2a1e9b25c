"""
nanoGPT's configurator, as a function: Python config files plus --key=value overrides.

    python sample.py config/type_3.py --seed=7 --knn_num=[0,0,0,0,0,0,5,5,5,0,0,0]

A config file is executed as Python and may compute values and define helper variables
(the reference's configs define `substitute`, for example). Its names that are config keys
are taken; other names are ignored, unless they look like a misspelt key, which is an
error. Overrides must name a known key; values are Python literals (strings may go
unquoted) and must have the type of the default (an int is accepted for a float).
"""

import ast
import difflib
import os
import re
import sys
import types
import warnings


class UserError(Exception):
    """A mistake in what the user asked for: run_cli prints it as one line and exits 2."""


def _closest(name, known):
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else f"; known keys: {', '.join(sorted(known))}"


# keys whose default is not None but which take None: top_k=None keeps every token (nanoGPT)
NULLABLE = {'top_k'}


def check_type(key, value, default, where):
    """value, checked to have the type of the default (an int is taken for a float); None only
    where the default is None or the key is in NULLABLE."""
    if value is None:
        if default is None or key in NULLABLE:
            return value
        raise UserError(f"{where}: {key}=None is not allowed; give a {type(default).__name__} like the default {default!r}")
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))  # a config may write ("Love", "Hate") for a list
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(f"{where}: {key}={value!r} should be a {type(default).__name__} like the default {default!r}")
    return value


def key_meanings(*modules):
    """{key: meaning} from the comments beside the keys of the modules' default dicts, written
    `    key=value,  # meaning` and continued on comment-only lines whose '#' is in the same
    column. The first module that describes a key wins."""
    meanings = {}
    for module in modules:
        with open(module if isinstance(module, str) else module.__file__, encoding='utf-8') as f:
            lines = f.read().splitlines()
        key = col = None
        for line in lines:
            m = re.match(r"\s+(\w+)=[^#]*(#)\s?(.*)$", line)
            if m:
                key, col = (m.group(1), m.start(2)) if m.group(1) not in meanings else (None, None)
                if key:
                    meanings[key] = m.group(3).strip()
            elif key is not None and line.find('#') == col and not line[:col].strip():
                meanings[key] += ' ' + line[col + 1:].strip()
            else:
                key = None
    return meanings


def print_help(defaults, usage, modules):
    """A script's --help: its usage text, then every key with its default and meaning."""
    meanings = key_meanings(*modules)
    print((usage or '').strip() + '\n\nkeys (set in a config file or as --key=value; defaults shown):')
    for key, value in defaults.items():
        shown = f"--{key}={value!r}"
        print(f"  {shown:<34} {meanings.get(key, '')}" if len(shown) <= 34 else f"  {shown}\n  {'':<34} {meanings.get(key, '')}")


def answer_help(defaults, usage, described_in):
    """--help (or -h) on the command line: print the script's help and exit. Scripts call it
    before they import torch and FAISS, which take seconds, so help answers at once."""
    if '--help' in sys.argv[1:] or '-h' in sys.argv[1:]:
        print_help(defaults, usage, described_in)
        raise SystemExit(0)


REPOSITORY = os.path.dirname(os.path.abspath(__file__))


def resolve_files(value, config_file, key):
    """value with every relative "FILE:path" of a config file made absolute, so a run works from
    any directory: the path is taken relative to the config file's folder if it exists there,
    else relative to the repository (configs/ name data/cats.txt that way). Lists, tuples and
    dicts (a sweep's grid) are walked."""
    if isinstance(value, str) and value.startswith('FILE:') and not os.path.isabs(value[5:]):
        tried = [os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(config_file)), value[5:])),
                 os.path.normpath(os.path.join(REPOSITORY, value[5:]))]
        found = next((p for p in tried if os.path.isfile(p)), None)
        if found is None:
            raise UserError(f"{config_file}: {key}={value!r} names a file that is neither at {tried[0]} (beside the "
                            f"config) nor at {tried[1]} (in the repository)")
        return 'FILE:' + found
    if isinstance(value, (list, tuple)):
        return type(value)(resolve_files(v, config_file, key) for v in value)
    if isinstance(value, dict):
        return {k: resolve_files(v, config_file, key) for k, v in value.items()}
    return value


def configure(defaults, argv, usage=None, described_in=()):
    """Return a copy of `defaults` updated by the config files and --key=value overrides in argv.
    --help (or -h) prints `usage` and the keys, with meanings from the comments in the
    `described_in` modules' (or files') sources, and exits."""
    if '--help' in argv or '-h' in argv:
        print_help(defaults, usage, described_in)
        raise SystemExit(0)
    config = dict(defaults)
    known = list(defaults)
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg} does not exist (configs live in config/; overrides are --key=value)")
            namespace = dict(config)
            try:
                with open(arg, encoding='utf-8') as f:
                    exec(compile(f.read(), arg, 'exec'), namespace)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"config file {arg} failed: {type(e).__name__}: {e}") from None
            for name, value in namespace.items():
                if name.startswith('_') or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue
                if name in config:
                    config[name] = check_type(name, resolve_files(value, arg, name), defaults[name], arg)
                elif difflib.get_close_matches(name, known, n=1, cutoff=0.85):
                    raise UserError(f"{arg}: unknown config key {name}{_closest(name, known)}")
        else:
            if '=' not in arg:
                raise UserError(f"override {arg} needs a value: --key=value")
            key, val = arg[2:].split('=', 1)
            if key not in config:
                raise UserError(f"unknown config key {key}{_closest(key, known)}")
            try:
                value = ast.literal_eval(val)
            except (SyntaxError, ValueError, MemoryError, RecursionError, TypeError):
                value = val  # a bare string (or one too long or deep for the parser: taken as text)
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = val  # --start=123 means the text "123"
            config[key] = check_type(key, value, defaults[key], f"--{key}")
    return config


def run_cli(main):
    """Run a script's main(argv); a UserError becomes one line on stderr and exit status 2.
    Warnings print as one line, "warning: ...", without the source line."""
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the environment: a missing, read-only or full place to read or write
        where = f"{e.filename}: " if e.filename else ''
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
