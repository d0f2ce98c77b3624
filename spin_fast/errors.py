"""The one exception type for bad user input (a file, a row, a config key, an argument, a model folder).

`InputError` messages name what is wrong and where ("data.jsonl:5: messages[1] ...", "config train.lr: ...").
The entry points (runtime.run_main) print an InputError as one line and exit 2; any other exception is a bug of
ours and keeps its traceback. It subclasses ValueError, so callers that catch ValueError still do.
"""


class InputError(ValueError):
    """Bad user input; str() names the file:row, key or argument and the problem."""
