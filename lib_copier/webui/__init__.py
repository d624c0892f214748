"""The WebUI layer: the tab, the gallery button, the HTTP routes.

Only here (and in backends/webui.py) is A1111 imported, and only inside functions, so `import lib_copier.webui`
works in a plain Python.
"""
