"""Runs what the sink sends to ClickHouse in the ClickHouse that chdb-core embeds, and checks the answers.

    check_sink_sql.py STEPS.json DATA_DIR

STEPS.json (written by tests/current_clickhouse.rs) is a list of steps, run in order in one chdb
session whose data lives in DATA_DIR (removed first):

  {"kind": "sql", "sql": ...}       a statement, verbatim, answered in TSV
      "params": {...}               the URL parameters the sink sent with it: `database` (USE),
                                    `default_format` (the sink's reads ask for RowBinary)
      "expect_tsv": text            the answer must be exactly this
      "expect_contains": text       the answer must contain this
      "expect_rows_hex": [hex, ...] the RowBinary answer must be these rows, in any order
  {"kind": "insert", "database": ..., "sql": "INSERT INTO t(cols) FORMAT RowBinary", "file": ...}
                                    the sink's insert with the RowBinary body it posted, from file

Exits 1 at the first statement chdb rejects or the first answer that differs.
"""

import itertools
import json
import shutil
import sys

import chdb
from chdb import session

ROWBINARY = " FORMAT RowBinary"


def fail(step, why):
    print(f"FAILED: {step.get('what', step['kind'])}: {why}\n  statement: {step['sql']}")
    sys.exit(1)


def run(s, step):
    sql = step["sql"]
    if step["kind"] == "insert":
        # The insert's own statement, its data read from the file instead of the request body.
        if not sql.endswith(ROWBINARY):
            fail(step, "not a RowBinary insert")
        path = step["file"].replace("'", "\\'")
        s.query(f"USE `{step['database']}`")
        s.query(f"{sql[: -len(ROWBINARY)]} FROM INFILE '{path}'{ROWBINARY}")
        return None
    params = dict(step.get("params", {}))
    if "database" in params:
        s.query(f"USE `{params.pop('database')}`")
    fmt = params.pop("default_format", "TSV")
    if params:
        fail(step, f"URL parameters the checker does not apply: {params}")
    return s.query(sql, fmt).bytes()


def check(step, answer):
    if "expect_tsv" in step and answer.decode() != step["expect_tsv"]:
        fail(step, f"answer\n{answer.decode()}differs from the expected\n{step['expect_tsv']}")
    if "expect_contains" in step and step["expect_contains"].encode() not in answer:
        fail(step, f"answer {answer!r} lacks {step['expect_contains']!r}")
    if "expect_rows_hex" in step:
        rows = [bytes.fromhex(h) for h in step["expect_rows_hex"]]
        if not any(b"".join(p) == answer for p in itertools.permutations(rows)):
            fail(step, f"answer {answer.hex()} is not the rows {step['expect_rows_hex']} in some order")


def main():
    steps_file, data_dir = sys.argv[1], sys.argv[2]
    steps = json.load(open(steps_file))
    shutil.rmtree(data_dir, ignore_errors=True)
    s = session.Session(data_dir)
    print(f"chdb-core {chdb.__version__}, ClickHouse {s.query('SELECT version()', 'TSVRaw').bytes().decode().strip()}")
    for step in steps:
        try:
            answer = run(s, step)
        except Exception as e:  # chdb raises its own error type for a rejected statement
            fail(step, f"ClickHouse rejected it: {e}")
        if answer is not None:
            check(step, answer)
        label = step.get("what") or step["sql"].split("\n")[0][:100]
        print(f"ok  {step['kind']:6} {label}")
    s.close()
    print(f"all {len(steps)} steps ok")


if __name__ == "__main__":
    main()
