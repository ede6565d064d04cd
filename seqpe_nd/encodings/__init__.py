"""Position encodings behind one interface: SeqPE integrations and every baseline."""
