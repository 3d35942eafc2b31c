"""The wheel factory: the build matrix in, smoke-tested wheels in per-variant pip indexes out.

Stages (each a module with typed inputs and outputs, each runnable alone from the CLI):

    matrix --expand--> cells --provision--> toolchain --plan--> plan
        --build--> wheel --tag--> tagged wheel --smoke--> verified | quarantine
        --publish--> whl/<variant>/simple/ + manifest.json --report--> table

Run it as ``python3 -m scripts.factory --help`` (the Makefile's ``wheels`` and
``matrix`` targets wrap it).
"""
