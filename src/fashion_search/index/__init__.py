"""Vector indexes behind one protocol, their atomic storage and the catalog index build."""
