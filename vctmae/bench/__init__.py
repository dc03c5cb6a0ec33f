"""Benchmarks: each measures a candidate against its baseline in the same run.

`vctmae bench {ingest,loader,step,kernel}` (vctmae/cli/bench.py) calls one module here;
each prints a table and writes JSON through `vctmae.bench.report.write_report`.
Stage packages hold no benchmark code: these modules time the code the product runs.
"""
