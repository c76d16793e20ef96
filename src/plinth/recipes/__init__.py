"""Recipes: short, readable compositions of plinth's library for each job ."""
