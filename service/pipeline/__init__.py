"""The assessment: the stages (decode -> detect -> crop -> quality -> segment -> classify), the decision
rules, the pixel measures, the case model and spare cores for overlapping stages.
"""
