"""The ORL dashboard: a Streamlit app (``streamlit run dashboard/app.py``) over the REST API.

It talks to the API over HTTP only (``ORL_API_URL``); it imports neither ``orl`` nor
``services``, so it can run on any host that reaches the API.
"""
