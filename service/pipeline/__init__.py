"""The join between the stages: the hub, the items that flow through it and the sender."""
