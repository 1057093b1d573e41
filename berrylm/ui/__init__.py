"""Front ends over HTTP: the Streamlit app (`berry ui`) and the terminal chat (`berry chat`)."""
