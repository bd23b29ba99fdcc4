"""Fleet emulation: many real edge runtimes against a real aggregator on a simulated clock."""
