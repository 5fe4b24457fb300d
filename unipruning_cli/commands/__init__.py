"""The commands a user runs (`unipruning prune | eval | export | apply | plan`): each sequences stages."""
