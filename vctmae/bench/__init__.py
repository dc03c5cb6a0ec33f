"""Benchmarks: each measures a candidate against its baseline in the same run.

`vctmae bench {ingest,loader,step,kernel,predict}` (vctmae/cli/bench.py) calls one module here;
each times with `vctmae.bench.report.time_calls`, prints a table and writes JSON through its
`Report`. Stage packages hold no benchmark code: these modules time the code the product runs.
"""
