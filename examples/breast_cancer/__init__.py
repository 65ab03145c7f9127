"""Binary classification of scikit-learn's bundled breast-cancer data (569 tumours, 30 features).

Run it with ``fl-keras-run --clients 3 -- -c "model='examples.breast_cancer.model:build'
dataset='examples.breast_cancer.data:load'"``.
"""
