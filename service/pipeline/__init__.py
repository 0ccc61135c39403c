"""The assessment: the stages (decode -> detect -> crop -> quality -> segment -> classify), the decision
rules, the pixel measures, test-time voting and spare cores for overlapping stages.
"""
