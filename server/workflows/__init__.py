"""TorchServe workflows: archives (.war), their spec and DAG, and running a DAG over the data plane."""
