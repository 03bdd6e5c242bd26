"""The application: recipes, the stages of a run and its folder, the preflight, the
command line. The only layer that imports all the others.
"""
