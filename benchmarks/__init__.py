"""The benchmarks: each headline printed by a script here, its baseline beside it in the same run
(`benchmarks/README.md` lists which command keeps which result)."""
