"""Benchmarks: `python -m nsoclip.bench {train,nso,data,hessian} [flags]`, each printing JSON.

Every figure is a ratio measured side by side in one process (these machines are noisy);
benchmarks/RESULTS.md keeps the latest figures with the commands that made them."""
