"""The SearchEngine and its faces: HTTP API and Streamlit UI."""
