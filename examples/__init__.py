"""Example models that ``osprey examples`` trains and packages."""
