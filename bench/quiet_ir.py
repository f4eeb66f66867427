"""Instructions of `OpenAIParser.quiet` on one paced content event (issue 21, step 6).

A paced stream's events arrive one per read, so the tap hands `quiet` a one-event run each time.
Count it under callgrind, N calls minus none (the interpreter's start-up cancels out; a fixed hash
seed keeps that start-up the same in both runs)::

    ir() { PYTHONHASHSEED=0 PYTHONPATH=. valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/quiet_ir.py $1 2>&1 | grep -o 'Collected : [0-9]*' | grep -o '[0-9]*'; }
    echo $(( ($(ir 20000) - $(ir 0)) / 20000 ))
"""

from __future__ import annotations

import sys

from meterproxy.providers.openai import OpenAIParser

EVENT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"bench-s200-d20",'
    b'"choices":[{"index":0,"delta":{"content":" tok17"},"finish_reason":null}],"usage":null}\n\n'
)


def main() -> None:
    parser = OpenAIParser(True, responses=False, endpoint="chat")  # usage was injected
    parser._seen_model = True  # past the first event, as in a stream under way
    assert parser.quiet(EVENT) == (len(EVENT), EVENT.replace(b',"usage":null', b"", 1))
    quiet = parser.quiet
    for _ in range(int(sys.argv[1])):
        quiet(EVENT)


if __name__ == "__main__":
    main()
