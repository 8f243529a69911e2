"""Engines that merge outside mergekit's pipeline: the adapter-native merge (:mod:`.adapter_merge`)."""
