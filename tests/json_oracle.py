"""An oracle for JSON-mode output that shares no code with serve/json_guide.py: `json.loads` (and jsonschema) judge
finished output, and a truncated output is a valid prefix when some short completion makes `json.loads` accept it.

The completion is the text's open containers closed in reverse, after one of a few tails that finish whatever is
cut (a string, an escape, a \\uXXXX, a number, a literal, a key without its value). Which containers are open is
found by a plain bracket count that skips string contents; the tails cover every place JSON can be cut.
"""

from __future__ import annotations

import json

import jsonschema

OBJECT = {"type": "object"}  # response_format json_object: one JSON object
TAILS = ["", "0", '"', '"k":0', ":0", '":0', "n\"", "n\":0", "rue", "ue", "e", "alse", "lse", "se", "ull", "ll", "l",
         *[z + q for z in ("0", "00", "000", "0000") for q in ('"', '":0')], "{}"]


def _open_containers(text: str) -> str:
    stack, in_string, escaped = [], False, False
    for c in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append(c)
        elif c in "}]" and stack:
            stack.pop()
    return "".join(stack)


def is_json_object(text: str) -> bool:
    """A whole JSON object, by json.loads, checked against the object schema."""
    try:
        jsonschema.validate(json.loads(text), OBJECT)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def is_json_object_prefix(text: str) -> bool:
    """Whether some completion of text is a JSON object (text may already be one)."""
    closers = "".join("}" if c == "{" else "]" for c in reversed(_open_containers(text)))
    return any(is_json_object(text + tail + closers) for tail in TAILS)
