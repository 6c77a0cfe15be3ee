"""The HTTP front end (aiohttp): the kiosk page and the native, AUTOMATIC1111 and OpenAI APIs.

server.py holds the front end and the native API, compat.py the two compatible APIs (their field
mappings in a1111.py and openai_images.py), watch.py the fan-out of the service's events.
"""
