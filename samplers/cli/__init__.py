"""The tooling behind ``python -m samplers``: the demo, the benchmarks, peers' adapters and the sharded sampler CLI.

Apart from the library so that ``import samplers`` pulls in none of it (nor matplotlib, torchsde or
diffusers, which only the tooling uses).  :mod:`samplers.cli.registry` is the one table of SDEs,
solvers and exact problems the commands share; each command is a module with ``main(argv)``,
dispatched by ``samplers/__main__.py``.  The library never imports this package.
"""
