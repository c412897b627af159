"""Run recbole_llm and RecBole models like RecBole's run_recbole.py.

    python run_recbole_llm.py --model=SASRec --dataset=ml-100k
    python run_recbole_llm.py --model=Pop,BPR,SASRec --dataset=ml-100k --epochs=1
    python run_recbole_llm.py --model=BPR --dataset=ml-100k --tune=properties/hyper/BPR.hyper
"""

import sys

from recbole_llm.cli import main

if __name__ == "__main__":
    sys.exit(main())
