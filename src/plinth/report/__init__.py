"""Run overviews: reads run directories only (never imports training code).

plinth report runs/<name>          # one self-contained HTML page for a run
plinth compare runs/a runs/b       # runs side by side (HTML + terminal summary)
plinth runs                        # list runs with status and headline metrics
"""
